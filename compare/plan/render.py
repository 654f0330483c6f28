"""The plan as a rich table, Markdown (layouts, memory and step-time breakdowns, assumptions) and a plot."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compare.cluster import Cluster
from compare.plan.assumptions import GB, Assumptions
from compare.plan.fit import Fit
from compare.plan.rank import Planned
from compare.plan.timing import tflops_per_tile


def _gb(x: float | None) -> str:
    return "–" if x is None else f"{x / GB:.1f}"


def _jax_cell(p: Planned) -> str:
    if p.jax is None:
        return "not probed (--jax)" if p.unprobed else "–"
    if not p.jax.get("ok"):
        return f"not available ({p.jax.get('reason', '?')[:60]})"
    over = p.memory is not None and p.jax["peak_bytes"] > p.memory.usable
    return jax_split(p.jax) + (" (over usable)" if over else "")


def jax_split(res: dict[str, Any]) -> str:
    """A JAX AOT result as 'peak (params P + temp T)' in GB: P the stored arguments (params, optimizer state),
    T XLA's temporaries (activations, gathered weights, gradients)."""
    m = res["memory"]
    return f"{_gb(res['peak_bytes'])} (args {_gb(m['argument'])} + temp {_gb(m['temp'])})"


PLAN_HEAD = ("#", "family", "layout", "variant", "GBS", "DS mem GB/tile", "margin GB (± model error)",
             "JAX mem GB/tile (XLA:CPU)", "samples/s", "TFLOPS/tile", "step s", "bubble")


def plan_rows(ok: Sequence[Planned], per_gbs: bool = False, jax_only: Sequence[Planned] = ()) -> list[list[str]]:
    """Table rows; ``per_gbs`` numbers the rank within each global batch (the grouped view). ``jax_only``:
    layouts DeepSpeed does not run, unnumbered ("–") after the ranked rows (of their GBS when ``per_gbs``), with
    no DeepSpeed figure and, once compiled, JAX's margin."""
    items = [(p, False) for p in ok] + [(p, True) for p in jax_only]
    if per_gbs:
        items.sort(key=lambda t: t[0].layout.gbs)  # stable: the ranked rows of a GBS, then its JAX-only ones
    rows = []
    i, last = 0, None
    for p, jax_row in items:
        s = p.step
        assert s is not None
        if jax_row:
            num, ds_mem, margin = "–", "–", _jax_margin(p)
        else:
            assert p.memory is not None
            i = i + 1 if not per_gbs or p.layout.gbs == last else 1
            last = p.layout.gbs
            num, ds_mem = str(i), _gb(p.memory.total)
            margin = f"{p.memory.margin / GB:.1f} (±{p.memory.err / GB:.1f})"
        rows.append([num, p.layout.family, p.layout.label, p.layout.variant, str(p.layout.gbs), ds_mem, margin,
                     _jax_cell(p), f"{s.sps:.3f}", f"{tflops_per_tile(s, p.layout):.1f}", f"{s.step_s:.2f}",
                     f"{s.bubble:.2f}"])
    return rows


def _jax_margin(p: Planned) -> str:
    """A JAX-only layout's margin: JAX's compiled peak against the usable memory, once compiled."""
    v = p.jax_judged
    if v is None or v["jax_verdict"] == "not compiled":
        return "–"
    return f"{v['jax_margin_gb']:.1f} (±{v['jax_err_gb']:.1f}) JAX"


def jax_only_note(rows: Sequence[Planned]) -> str:
    """What the "–" rows are: layouts DeepSpeed does not run, and why not."""
    why = sorted({p.ds_refusal for p in rows})
    return ("–: JAX only, DeepSpeed does not run it: " + "; ".join(why) + ". No DeepSpeed memory figure, not "
            "ranked: listed after the ranked rows of its GBS, its memory verdict is JAX's compiled peak (--jax)")


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def memory_breakdown(p: Planned) -> str:
    assert p.memory is not None
    rows = [[t.name, f"{t.value / GB:.2f}", t.note] for t in p.memory.terms]
    rows.append(["**total**", f"**{p.memory.total / GB:.2f}**", f"stage {p.memory.stage}; usable "
                 f"{p.memory.usable / GB:.1f} GB; {p.memory.verdict()}"])
    return _md_table(("DeepSpeed memory term", "GB/tile", "how"), rows)


def time_breakdown(p: Planned) -> str:
    assert p.step is not None
    rows = [[t.name, f"{t.value:.3f}", t.note] for t in p.step.terms]
    for c in p.step.comms_mb + p.step.comms_step:
        per = "microbatch" if c in p.step.comms_mb else "step"
        rows.append([f"{c.name} ({c.kind})", f"{c.seconds:.3f}", f"{c.count:g} x {c.nbytes / GB:.3f} GB per {per} "
                     f"over {c.group.n} ranks, {c.group.where}" + (", overlappable" if c.overlappable else "")])
    rows.append(["**step**", f"**{p.step.step_s:.2f}**", f"{p.step.sps:.3f} samples/s"])
    return _md_table(("step-time term", "seconds", "how"), rows)


def assumptions_md(a: Assumptions, cluster: Cluster, fit: Fit | None) -> str:
    lines = [f"Cluster: {cluster.describe()}", ""]
    for f in dataclasses.fields(a):
        tag = " (fitted)" if f.name in Assumptions.FITTED and fit else ""
        lines.append(f"- `{f.name}` = {getattr(a, f.name)}{tag}")
    return "\n".join(lines) + "\n"


def plot_plan(ok: Sequence[Planned], rejected: Sequence[Planned], cluster: Cluster, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(ok[:15]) + [p for p in rejected if p.memory is not None][:8]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.38 * len(items) + 1.5)), sharey=True)
    names = [f"GBS {p.layout.gbs}: {p.layout.label} ({p.layout.variant})" for p in items]
    y = np.arange(len(items))
    ax1.barh(y, [p.step.sps if p.fits and p.step else 0 for p in items], color="tab:blue")
    ax1.set_yticks(y, names, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("predicted samples/s (rejected: 0)")
    ax2.barh(y, [p.memory.total / GB if p.memory else 0 for p in items],
             color=["tab:green" if p.fits else "tab:red" for p in items])
    ax2.axvline(cluster.usable_bytes / GB, color="k", ls="--", label="usable per tile")
    jx = [(i, p.jax["peak_bytes"] / GB) for i, p in enumerate(items) if p.jax and p.jax.get("ok")]
    if jx:
        ax2.scatter([v for _, v in jx], [i for i, _ in jx], color="k", marker="x", label="JAX compiled (XLA:CPU)")
    ax2.set_xlabel("DeepSpeed-modelled memory per tile (GB)")
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long layout labels on the left
    plt.close(fig)
    return path


def _print_rich(title: str, head: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in head:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    con = Console(width=max(160, Console().width))
    con.print(table)
    for n in notes:
        con.print(n, highlight=False)
