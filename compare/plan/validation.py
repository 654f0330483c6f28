"""The planner against the study's CSV: memory verdicts, samples/s (fitted and leave-one-out), the per-microbatch
and fixed per-step parts from its GAS sweeps, and the order of layouts at a fixed global batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compare.cluster import Cluster, load_cluster
from compare.plan.assumptions import GB, Assumptions
from compare.plan.fit import Fit, _ok_rows, calibrate
from compare.plan.layout import Layout, layout_from_row
from compare.plan.memory import MemoryEstimate, deepspeed_estimate, ds_memory
from compare.plan.rank import mics_shard_sizes
from compare.plan.render import _md_table, assumptions_md
from compare.plan.timing import step_time
from compare.reference import DEFAULT_REFERENCE, Row, load_reference


def mics_fits(row: Row, cluster: Cluster, a: Assumptions) -> list[tuple[int, MemoryEstimate]]:
    """For a MiCS row: every shard size (1, 2, 4, ... nodes, all its tiles) dividing its DP, with its estimate."""
    out = []
    for shard in mics_shard_sizes(row.dp, cluster.tiles_per_node):
        if row.dp % shard == 0 and shard > 1:
            lay = layout_from_row(row, cluster.tiles_per_node, mics_shard=shard)
            out.append((shard, ds_memory(row.model, lay, cluster, a, row.seq)))
    return out


def _family_key(r: Row, cluster: Cluster) -> tuple:
    lay = layout_from_row(r, cluster.tiles_per_node)
    return (r.model, lay.family, lay.pp, lay.tp, lay.mbs, lay.remat)


def step_terms(rows: Sequence[Row], cluster: Cluster, a: Assumptions) -> list[dict[str, Any]]:
    """Per measured row: the per-microbatch time and the fixed per-step part, measured and modelled.

    Measured, from the study's GAS sweeps: step time = slots x per-microbatch + fixed (slots = GAS + PP - 1),
    a line through the rows of one layout and node count. A row without a sweep of its own takes the slope of its
    family's sweep at another width, scaled by the model's ratio of per-microbatch times, and says so."""
    ok = _ok_rows(rows)
    sweeps: dict[tuple, list[Row]] = {}
    for r in ok:
        sweeps.setdefault((*_family_key(r, cluster), r.nodes), []).append(r)
    slopes: dict[tuple, tuple[float, Row]] = {}
    for key, rs in sweeps.items():
        if len({r.gas for r in rs}) >= 2:
            slots = np.array([r.gas + r.pp - 1 for r in rs], dtype=float)
            step = np.array([r.gbs / r.sps for r in rs])  # type: ignore[operator]
            slopes[key] = (float(np.polyfit(slots, step, 1)[0]), rs[0])
    out = []
    for r in ok:
        lay = layout_from_row(r, cluster.tiles_per_node)
        est = step_time(r.model, lay, cluster, a, r.seq)
        key = (*_family_key(r, cluster), r.nodes)
        if key in slopes:
            mb, src = slopes[key][0], f"{r.nodes}-node GAS sweep"
        else:
            other = [(k, v) for k, v in slopes.items() if k[:-1] == key[:-1]]
            if not other:
                mb, src = float("nan"), "no sweep"
            else:
                k, (slope, ref) = min(other, key=lambda kv: abs(kv[0][-1] - r.nodes))
                ref_est = step_time(ref.model, layout_from_row(ref, cluster.tiles_per_node), cluster, a, ref.seq)
                mb, src = slope * est.mb_s / ref_est.mb_s, f"{k[-1]}-node sweep x model ratio"
        slots = lay.gas + lay.pp - 1
        step = r.gbs / r.sps  # type: ignore[operator]
        out.append({"run": r.run, "family": lay.family, "nodes": r.nodes, "dp": lay.dp, "gas": lay.gas,
                    "step": step, "step_pred": est.step_s, "mb": mb, "mb_pred": est.mb_s,
                    "fixed": step - slots * mb, "fixed_pred": est.step_s - slots * est.mb_s, "source": src})
    return out


def zero3_trend(rows: Sequence[Row], cluster: Cluster, a: Assumptions, nodes: Sequence[int] = (4, 6, 8, 16, 32)
                ) -> list[str]:
    """Lines: the ZeRO-3+hpZ fixed per-step part against DP, measured (study rows at GAS 1) and modelled."""
    lines = []
    for d in step_terms(rows, cluster, a):
        if d["family"] == "ZeRO-3+hpZ" and d["gas"] == 1:
            lines.append(f"measured  DP {d['dp']:>4}: step {d['step']:.1f} s = {d['mb']:.1f} s/microbatch "
                         f"({d['source']}) + fixed {d['fixed']:.1f} s; model: step {d['step_pred']:.1f} s, fixed "
                         f"{d['fixed_pred']:.1f} s")
    for n in nodes:
        lay = Layout("ZeRO-3+hpZ", data=n, fsdp=cluster.tiles_per_node, zero=3, hpz=True)
        est = step_time("llama2-70b", lay, cluster, a)
        per_step = sum(c.seconds for c in est.comms_step)
        lines.append(f"model     DP {lay.dp:>4}: step {est.step_s:.1f} s at GAS 1, fixed {est.step_s - est.mb_s:.1f} s "
                     f"(per-step collectives {per_step:.1f} s)")
    return lines


VALID_HEAD = ("run", "model", "layout", "variant", "measured", "memory verdict (DS model)",
              "model states GB: here / DeepSpeed est.", "sps measured", "sps predicted", "err", "sps LOO", "LOO err",
              "s/microbatch meas / pred", "fixed s/step meas / pred")


def _ds_states(model: str, lay: Layout, cluster: Cluster, a: Assumptions, seq: int) -> str:
    try:
        est = deepspeed_estimate(model, lay, cluster, a, seq)
    except ImportError:  # DeepSpeed is the optional torch extra
        return "– (no deepspeed)"
    _, ours, theirs, _ = est[-1]
    return f"{ours / GB:.1f} / {theirs / GB:.1f}"


def validate(cluster: Cluster | None = None, a: Assumptions | None = None,
             reference: Path = DEFAULT_REFERENCE) -> tuple[list[list[str]], Fit, Assumptions]:
    cluster = cluster or load_cluster("aurora")
    rows = load_reference(reference)
    fit = calibrate(rows, cluster, a or Assumptions())
    fitted = dataclasses.replace(a or Assumptions(), **fit.params)
    by_run = {d["run"]: d for d in fit.rows}
    terms = {d["run"]: d for d in step_terms(rows, cluster, fitted)}
    out = []
    for r in rows:
        lay = layout_from_row(r, cluster.tiles_per_node)
        mem = ds_memory(r.model, lay, cluster, fitted, r.seq)
        pred = ("uncertain" if mem.uncertain else "fits" if mem.fits else "OOM") + (
            f" ({mem.margin / GB:+.1f} GB margin, ±{mem.err / GB:.1f})" if mem.fits else
            f" (+{-mem.margin / GB:.1f} GB over, ±{mem.err / GB:.1f})")
        if r.zero == 3 and r.mics_shard is None:  # MiCS, shard size unrecorded: which sizes would fit
            fitting = [str(n) for n, e in mics_fits(r, cluster, fitted) if e.fits and not e.uncertain]
            pred = ("MiCS shard unrecorded; fits at " + ", ".join(fitting) + " tiles") if fitting else (
                "MiCS shard unrecorded; no shard size fits")
        d, t = by_run.get(r.run), terms.get(r.run)
        out.append([r.run, r.model, lay.label, lay.variant, r.status, pred, _ds_states(r.model, lay, cluster, fitted,
                                                                                       r.seq),
                    f"{r.sps:.3f}" if r.sps else "–", f"{d['predicted']:.3f}" if d else "–",
                    f"{d['err']:+.1%}" if d else "–", f"{d['loo_predicted']:.3f}" if d else "–",
                    f"{d['loo_err']:+.1%}" if d else "–",
                    f"{t['mb']:.2f} / {t['mb_pred']:.2f}" if t and t["mb"] == t["mb"] else "–",
                    f"{t['fixed']:.2f} / {t['fixed_pred']:.2f}" if t and t["fixed"] == t["fixed"] else "–"])
    return out, fit, fitted


def ranking_groups(rows: Sequence[Row]) -> list[list[Row]]:
    """Reference rows with the same model, node count, GBS and sequence, in groups of >= 2 distinct layouts."""
    by: dict[tuple[str, int, int, int], list[Row]] = {}
    for r in rows:
        by.setdefault((r.model, r.nodes, r.gbs, r.seq), []).append(r)
    out = []
    for rs in by.values():
        lays = {(lay.label, lay.variant) for lay in map(layout_from_row, rs)}
        if len(lays) >= 2:
            out.append(rs)
    return out


def ranking_check(cluster: Cluster, a: Assumptions, rows: Sequence[Row] | None = None) -> list[dict[str, Any]]:
    """Per group of ``ranking_groups``: the measured order (fastest first; OOM and hung runs last) beside the
    planner's (predicted samples/s; predicted OOM last), and whether they agree."""
    rows = rows if rows is not None else load_reference(DEFAULT_REFERENCE)
    out = []
    for rs in ranking_groups(rows):
        def name(r: Row) -> str:
            lay = layout_from_row(r, cluster.tiles_per_node)
            return f"{lay.label} ({lay.variant})"

        measured = sorted(rs, key=lambda r: (r.status != "ok", -(r.sps or 0), r.run))
        pred: dict[str, tuple[bool, float]] = {}
        for r in rs:
            lay = layout_from_row(r, cluster.tiles_per_node)
            mem = ds_memory(r.model, lay, cluster, a, r.seq)
            oom = not mem.fits and not mem.uncertain  # uncertain: the model cannot say it goes last
            pred[r.run] = (oom, step_time(r.model, lay, cluster, a, r.seq).sps)
        planner = sorted(rs, key=lambda r: (pred[r.run][0], -pred[r.run][1], r.run))
        out.append({
            "group": f"{rs[0].model}, {rs[0].nodes} nodes, GBS {rs[0].gbs}, seq {rs[0].seq}",
            "measured": [f"{name(r)}: " + (f"{r.sps:.3f}" if r.status == "ok" and r.sps else r.status.upper())
                         for r in measured],
            "planner": [f"{name(r)}: " + ("OOM" if pred[r.run][0] else f"{pred[r.run][1]:.3f}") for r in planner],
            "agree": [r.run for r in measured] == [r.run for r in planner],
        })
    return out


def validation_markdown(cluster: Cluster | None = None, a: Assumptions | None = None) -> str:
    """Predicted vs measured for every reference row, as Markdown (for the compare report)."""
    c = cluster or load_cluster("aurora")
    return _validation_md(*validate(c, a), c)


def _validation_md(rows: list[list[str]], fit: Fit, fitted: Assumptions, c: Cluster) -> str:
    return (
        "## Layout planner vs the study\n\n"
        + _md_table(VALID_HEAD, rows)
        + f"\nFitted on {len(fit.rows)} measured rows: "
        + ", ".join(f"`{k}` = {v:.3f}" for k, v in fit.params.items())
        + f". RMS log error {fit.rms_log:.3f}; max |error| {fit.max_err:.1%}; leave-one-out |error| mean "
        f"{fit.loo_mean:.1%}, max {fit.loo_max:.1%}. Memory: DeepSpeed model on {c.name} "
        f"({c.usable_bytes / GB:.1f} GB usable per tile), its error ±{fitted.mem_err_states:.0%} of the model "
        f"states and buckets, ±{fitted.mem_err_act:.0%} of the activations (benchmarks/ds_memory_check.py); "
        "model states beside DeepSpeed's own estimator "
        "(`estimate_zero2/3_model_states_mem_needs`, no offload). Step-time terms: per-microbatch time and fixed "
        "per-step part, measured from the study's GAS sweeps (step = (GAS + PP - 1) x microbatch + fixed) and "
        "modelled. Hangs (status `hang`) are not modelled: the memory model can only say whether the layout "
        "fits.\n\n### ZeRO-3+hpZ fixed per-step part against DP\n\n"
        + "\n".join(f"- {ln}" for ln in zero3_trend(load_reference(DEFAULT_REFERENCE), c, fitted))
        + "\n\n### Ranking at a fixed global batch\n\n"
        "Reference rows with the same model, node count, GBS and sequence and at least two layouts: the measured "
        "order (fastest first; OOM and hung runs last) beside the planner's (predicted samples/s; predicted OOM "
        "last).\n\n" + _md_table(RANK_HEAD, ranking_rows(ranking_check(c, fitted)))
        + "\n### Assumptions\n\n" + assumptions_md(fitted, c, fit)
    )


RANK_HEAD = ("group", "measured order (samples/s)", "planner order (predicted samples/s)", "same order")


def ranking_rows(checks: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[g["group"], " > ".join(g["measured"]), " > ".join(g["planner"]), "yes" if g["agree"] else "NO"]
            for g in checks]


def plot_validation(fit: Fit, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    meas = [d["measured"] for d in fit.rows]
    ax.scatter(meas, [d["predicted"] for d in fit.rows], label="fit on all rows")
    ax.scatter(meas, [d["loo_predicted"] for d in fit.rows], marker="x", label="leave-one-out")
    lo, hi = min(meas) * 0.8, max(meas) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("measured samples/s")
    ax.set_ylabel("predicted samples/s")
    ax.set_title("Step-time model vs the study")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
