"""Loss and learning rate over steps, from run directories' ``metrics.jsonl``, as one PNG.

    python -m compare.plot RUN_DIR                     # -> RUN_DIR/loss.png
    python -m compare.plot RUN_A RUN_B ... [--out F]   # runs overlaid -> F (default ./loss.png)

Both trainers write the same metrics schema (runtime/rundir.py), so JAX and DeepSpeed runs overlay.
The trainers call ``write_run_plot`` after their last step; a failure there is a warning, never a
failed run.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime import rundir

PLOT_NAME = "loss.png"


class PlotError(ValueError):
    """A run directory that cannot be plotted (no metrics, unreadable lines)."""


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """The run's metrics rows in step order; a PlotError naming the file if there are none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist; pass a run directory a trainer wrote (runs/<name>)")
    try:
        rows = rundir.read_metrics(run_dir)
    except ValueError as e:
        raise PlotError(str(e)) from None
    bad = [n for n, r in enumerate(rows, 1) if not isinstance(r, dict) or "step" not in r]
    if bad:
        raise PlotError(f"{path} line {bad[0]} has no 'step': not a trainer's metrics file")
    if not rows:
        raise PlotError(f"{path} has no steps yet")
    return sorted(rows, key=lambda r: r["step"])


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def figure(run_dirs: Sequence[Path | str]) -> Any:
    """A matplotlib Figure: loss (top) and learning rate (bottom) over steps, one line per run, labelled by
    the run directory's name."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(6.4, 5.2), height_ratios=(2, 1))
    for d, rows in runs:
        label = d.resolve().name
        ax_loss.plot(*_series(rows, "loss"), lw=1.4, label=label)
        ax_lr.plot(*_series(rows, "lr"), lw=1.2, label=label)
    ax_loss.set_ylabel("loss")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_loss.legend(fontsize=8)
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: Sequence[Path | str], out: Path | str) -> Path:
    """``figure(run_dirs)`` written to ``out`` (PNG); returns ``out``."""
    import matplotlib.pyplot as plt

    fig = figure(run_dirs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out


def write_run_plot(run_dir: Path | str) -> Path | None:
    """RUN_DIR/loss.png, its path printed; any failure is a warning on stderr and None (a finished run stays
    finished: matplotlib missing or a full disk must not turn it into a failed one)."""
    try:
        out = plot_runs([run_dir], Path(run_dir) / PLOT_NAME)
    except Exception as e:  # deliberately broad, see the docstring
        print(f"warning: no {PLOT_NAME} for {run_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    print(f"loss curve: {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compare.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    ap.add_argument("--out", type=Path, help=f"the PNG (default: RUN_DIR/{PLOT_NAME} for one run, "
                                             f"./{PLOT_NAME} for several)")
    args = ap.parse_args(argv)
    out = args.out or (Path(args.run_dirs[0]) / PLOT_NAME if len(args.run_dirs) == 1 else Path(PLOT_NAME))
    try:
        path = plot_runs(args.run_dirs, out)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
