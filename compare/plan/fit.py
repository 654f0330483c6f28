"""The step-time model fitted to the study's measured rows (``Assumptions.FITTED``; least squares on log
samples/s), with per-row and leave-one-out errors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compare.cluster import Cluster, load_cluster
from compare.plan.assumptions import Assumptions
from compare.plan.layout import layout_from_row
from compare.plan.timing import step_time
from compare.reference import DEFAULT_REFERENCE, Row, load_reference


@dataclass
class Fit:
    params: dict[str, float]
    rows: list[dict[str, Any]]  # run, measured, predicted, error, loo prediction, loo error
    rms_log: float
    loo_max: float
    loo_mean: float

    @property
    def max_err(self) -> float:
        return max(abs(r["err"]) for r in self.rows)


def _ok_rows(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.status == "ok" and r.sps]


def _with(a: Assumptions, x: np.ndarray) -> Assumptions:
    # the fitted values live in (0, 1) through a logistic: the fit cannot leave the physical range
    vals = 1.0 / (1.0 + np.exp(-x))
    return dataclasses.replace(a, **dict(zip(Assumptions.FITTED, map(float, vals), strict=True)))


def _logit(v: float) -> float:
    v = min(max(v, 1e-4), 1 - 1e-4)
    return math.log(v / (1 - v))


def _residuals(x: np.ndarray, rows: Sequence[Row], cluster: Cluster, a: Assumptions) -> np.ndarray:
    aa = _with(a, x)
    return np.array([math.log(step_time(r.model, layout_from_row(r, cluster.tiles_per_node), cluster, aa,
                                        r.seq).sps / r.sps) for r in rows])


def _least_squares(rows: Sequence[Row], cluster: Cluster, a: Assumptions, x0: np.ndarray) -> np.ndarray:
    """Levenberg-Marquardt with a forward-difference Jacobian (a few parameters; numpy only)."""
    x, lam = x0.copy(), 1e-2
    r = _residuals(x, rows, cluster, a)
    cost = float(r @ r)
    for _ in range(100):
        J = np.empty((len(r), len(x)))
        for j in range(len(x)):
            dx = np.zeros_like(x)
            dx[j] = 1e-6
            J[:, j] = (_residuals(x + dx, rows, cluster, a) - r) / 1e-6
        g, H = J.T @ r, J.T @ J
        improved = False
        for _ in range(20):
            step = np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), -g)
            xn = np.clip(x + step, -9, 9)
            rn = _residuals(xn, rows, cluster, a)
            cn = float(rn @ rn)
            if cn < cost:
                x, r, cost, lam, improved = xn, rn, cn, lam / 3, True
                break
            lam *= 4
        if not improved or float(np.abs(step).max()) < 1e-7:
            break
    return x


def calibrate(rows: Sequence[Row] | None = None, cluster: Cluster | None = None,
              a: Assumptions | None = None, loo: bool = True) -> Fit:
    """Fit ``Assumptions.FITTED`` on the measured rows; per-row and leave-one-out errors of samples/s."""
    rows = _ok_rows(load_reference(DEFAULT_REFERENCE) if rows is None else rows)
    cluster = cluster or load_cluster("aurora")
    a = a or Assumptions()
    x0 = np.array([_logit(getattr(a, k)) for k in Assumptions.FITTED])
    x = _least_squares(rows, cluster, a, x0)
    fitted = _with(a, x)
    res = _residuals(x, rows, cluster, a)
    out: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        pred = r.sps * math.exp(res[i])
        d: dict[str, Any] = {"run": r.run, "model": r.model, "layout": layout_from_row(r).label,
                             "variant": layout_from_row(r).variant, "measured": r.sps, "predicted": pred,
                             "err": pred / r.sps - 1}
        if loo:
            rest = [q for j, q in enumerate(rows) if j != i]
            xi = _least_squares(rest, cluster, a, x)
            d["loo_predicted"] = r.sps * math.exp(_residuals(xi, [r], cluster, a)[0])
            d["loo_err"] = d["loo_predicted"] / r.sps - 1
        out.append(d)
    loo_errs = [abs(d["loo_err"]) for d in out] if loo else [float("nan")]
    return Fit({k: getattr(fitted, k) for k in Assumptions.FITTED}, out, float(np.sqrt(np.mean(res**2))),
               max(loo_errs), float(np.mean(loo_errs)))
