"""The study's published table (``compare/data/aurora_reference_runs.csv``) and its arithmetic.

Every derived cell of a row is recomputed from its samples/s (sps) and its layout:

* GBS = MBS * GAS * DP; NGPU = nodes * 12 = PP * DP * TP.
* tokens/GPU/s = sps * seq / NGPU.
* TFLOPS/tile = sps * F / NGPU / 1e12, F per sample from ``ModelConfig.flops_per_sample`` (Megatron-LM,
  ``megatron_lm``) or ``flops_per_sample_legacy`` (old Megatron-DeepSpeed, ``megatron_ds_legacy``).

Tolerance. A published cell v_pub is v(sps_true) rounded to its own last digit, and sps itself is
published rounded to its last digit (0.001). Recomputing from the rounded sps can therefore be off by
the rounding of v_pub (<= 0.005 for 0.01 cells) plus the propagated sps rounding. Since v is linear in
sps, that second term is v / sps * (half a unit of sps's last digit). The check accepts

    |v_recomputed - v_pub| <= 0.01 + v_recomputed / sps * 0.5 * 10**-(decimals of sps)

(e.g. ~0.019 TFLOPS and ~0.031 tokens/GPU/s for a 96-tile 70B row); anything beyond is flagged.

Normalised column: every row's model TFLOPS/tile and MFU under one formula (Megatron-LM by default) at the
seq that row ran at; a what-if at another seq only as extra columns labelled ``what-if`` (``normalise``).

``python -m compare.reference [--reference FILE.csv] [--out DIR] [--formula F] [--what-if-seq N] [--assert]``
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import ConfigError, ModelConfig, list_presets, load_preset

DEFAULT_REFERENCE = Path(__file__).parent / "data" / "aurora_reference_runs.csv"
DEFAULT_OUT = Path("reports") / "reference"
TILES_PER_NODE = 12  # Aurora: 6 PVC GPUs x 2 tiles
PEAK_TFLOPS_BF16 = 298.0  # per tile, 512 ops/clk/EU x 448 EUs x 1.3 GHz
FORMULAS = ("megatron_lm", "megatron_ds_legacy")
BASE_TOL = 0.01  # published tflops are rounded to 0.01, tpgps to 0.001

COLUMNS = (
    "run", "model", "nodes", "ngpu", "pp", "dp", "tp", "zero", "hpz", "mics_shard", "mbs", "gas", "gbs",
    "ackpt", "seq", "flops_formula", "tflops", "sps", "tpgps", "status",
)  # fmt: skip
_INT_COLUMNS = ("nodes", "ngpu", "pp", "dp", "tp", "zero", "hpz", "mics_shard", "mbs", "gas", "gbs", "seq")
_FLOAT_COLUMNS = ("tflops", "sps", "tpgps")
# Cells that may be empty: the measurements (oom/hang runs have none) and MiCS's unrecorded shard size.
_OPTIONAL = {"hpz", "mics_shard", "tflops", "sps", "tpgps"}


class ReferenceFormatError(ValueError):
    """A malformed reference CSV; the message names the file and the line."""


@dataclass
class Row:
    """One published run. Empty cells are None; ``line`` is the 1-based line in ``source``."""

    run: str
    model: str
    nodes: int
    ngpu: int
    pp: int
    dp: int
    tp: int
    zero: int
    hpz: int | None
    mics_shard: int | None
    mbs: int
    gas: int
    gbs: int
    ackpt: bool
    seq: int
    flops_formula: str
    tflops: float | None
    sps: float | None
    tpgps: float | None
    status: str
    source: str = ""
    line: int = 0
    sps_decimals: int = 3  # digits after the point in the published sps cell (sets the tolerance)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class RowCheck:
    """A row with every derived cell recomputed; ``flags`` is empty when the row is consistent."""

    row: Row
    layout: str
    gbs: int  # mbs * gas * dp
    ngpu_nodes: int  # nodes * 12
    ngpu_layout: int  # pp * dp * tp
    ngpu_used: int  # the NGPU the arithmetic supports (used for the recomputed cells)
    ngpu_from_tflops: int | None  # round(sps * F / tflops / 1e12)
    ngpu_from_tpgps: int | None  # round(sps * seq / tpgps)
    flops_per_sample: float
    tflops: float | None  # recomputed under the row's formula and seq
    tflops_tol: float | None
    tpgps: float | None
    tpgps_tol: float | None
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.flags


# ----------------------------------------------------------------------------- models and formulas
@functools.cache
def _models() -> dict[str, ModelConfig]:
    """model.name -> ModelConfig over the project's presets (the CSV's model column uses these names)."""
    out: dict[str, ModelConfig] = {}
    for preset in list_presets():
        try:
            m = load_preset(preset).model
        except (ConfigError, tomllib.TOMLDecodeError):  # a broken preset elsewhere must not hide the study models
            continue
        out.setdefault(m.name, m)
    return out


def model_config(name: str) -> ModelConfig:
    models = _models()
    if name not in models:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(models))}")
    return models[name]


def flops_per_sample(model: str | ModelConfig, formula: str, seq: int, ackpt: bool) -> float:
    """F per sample under ``formula``; the arithmetic itself lives in configs.schema.ModelConfig."""
    m = model_config(model) if isinstance(model, str) else model
    if formula == "megatron_lm":
        return m.flops_per_sample(seq)
    if formula == "megatron_ds_legacy":
        return m.flops_per_sample_legacy(seq, activation_checkpointing=ackpt)
    raise ValueError(f"unknown flops formula {formula!r}; use one of {', '.join(FORMULAS)}")


def layout(row: Row) -> str:
    """The study's name for a row's layout (the plot's series)."""
    if row.pp > 1:
        return f"PP+ZeRO-{row.zero} TP={row.tp}"
    if row.zero == 3 and (row.mics_shard is None or row.mics_shard > 0):
        return "ZeRO-3 MiCS" + (f" TP={row.tp}" if row.tp > 1 else "")
    if row.zero == 3 and (row.hpz or 1) > 1:
        return "ZeRO-3+hpZ" + (f" TP={row.tp}" if row.tp > 1 else "")
    if row.tp > 1:
        return f"TP={row.tp}+ZeRO-{row.zero}"
    return f"ZeRO-{row.zero}"


# ----------------------------------------------------------------------------- loading
def _parse_row(cells: dict[str, str], where: str) -> Row:
    vals: dict[str, Any] = {}
    for col in COLUMNS:
        raw = cells[col].strip()
        if raw == "":
            if col not in _OPTIONAL:
                raise ReferenceFormatError(f"{where}: column {col!r} is empty; it is required")
            vals[col] = None
        elif col in _INT_COLUMNS:
            try:
                vals[col] = int(raw)
            except ValueError:
                raise ReferenceFormatError(f"{where}: column {col!r} = {raw!r} is not an integer") from None
        elif col in _FLOAT_COLUMNS:
            try:
                vals[col] = float(raw)
            except ValueError:
                raise ReferenceFormatError(f"{where}: column {col!r} = {raw!r} is not a number") from None
        elif col == "ackpt":
            if raw.lower() not in ("true", "false"):
                raise ReferenceFormatError(f"{where}: column 'ackpt' = {raw!r} is not true or false")
            vals[col] = raw.lower() == "true"
        else:
            vals[col] = raw
    try:
        model_config(vals["model"])
    except KeyError as e:
        raise ReferenceFormatError(f"{where}: {e.args[0]}") from None
    if vals["flops_formula"] not in FORMULAS:
        raise ReferenceFormatError(
            f"{where}: unknown flops_formula {vals['flops_formula']!r}; use one of {', '.join(FORMULAS)}"
        )
    sps_raw = cells["sps"].strip()
    decimals = len(sps_raw.split(".", 1)[1]) if "." in sps_raw and "e" not in sps_raw.lower() else 0
    return Row(**vals, sps_decimals=decimals)


def load_reference(path: str | Path = DEFAULT_REFERENCE) -> list[Row]:
    """Parse the reference CSV (``#`` lines are comments). Errors name the file and the line."""
    path = Path(path)
    rows: list[Row] = []
    header: list[str] | None = None
    with path.open(newline="") as f:
        # Parse line by line (no multi-line cells in this format) so every error knows its line number.
        for lineno, text in enumerate(f, start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            where = f"{path}:{lineno}"
            cells = next(csv.reader([text]))
            if header is None:
                header = [c.strip() for c in cells]
                missing = [c for c in COLUMNS if c not in header]
                extra = [c for c in header if c not in COLUMNS]
                if missing or extra or len(set(header)) != len(header):
                    raise ReferenceFormatError(
                        f"{where}: header does not match the reference format"
                        + (f"; missing {', '.join(missing)}" if missing else "")
                        + (f"; unknown {', '.join(extra)}" if extra else "")
                        + f"; expected columns: {','.join(COLUMNS)}"
                    )
                continue
            if len(cells) != len(header):
                raise ReferenceFormatError(f"{where}: {len(cells)} columns, the header has {len(header)}")
            row = _parse_row(dict(zip(header, cells, strict=True)), where)
            row.source, row.line = str(path), lineno
            rows.append(row)
    if header is None:
        raise ReferenceFormatError(f"{path}: no header line (only comments or empty)")
    return rows


# ----------------------------------------------------------------------------- checking
def _tol(value: float, row: Row) -> float:
    # 0.01 for the cell's own rounding, plus sps's last-digit rounding carried through (value is linear in sps).
    assert row.sps and row.sps > 0
    return BASE_TOL + abs(value) / row.sps * 0.5 * 10.0 ** (-row.sps_decimals)


def check_row(row: Row) -> RowCheck:
    """Recompute GBS, NGPU, TFLOPS/tile and tokens/GPU/s of one row and flag what disagrees."""
    flags: list[str] = []
    gbs = row.mbs * row.gas * row.dp
    if gbs != row.gbs:
        flags.append(f"gbs={row.gbs} but mbs*gas*dp = {row.mbs}*{row.gas}*{row.dp} = {gbs}")

    f = flops_per_sample(row.model, row.flops_formula, row.seq, row.ackpt)
    n_nodes, n_layout = row.nodes * TILES_PER_NODE, row.pp * row.dp * row.tp
    from_tflops = round(row.sps * f / (row.tflops * 1e12)) if row.sps and row.tflops else None
    from_tpgps = round(row.sps * row.seq / row.tpgps) if row.sps and row.tpgps else None
    if n_nodes != n_layout:
        flags.append(f"nodes*12 = {n_nodes} but pp*dp*tp = {row.pp}*{row.dp}*{row.tp} = {n_layout}")
    # The hardware count (nodes*12) wins unless the layout and the measured cells agree on another value.
    ngpu_used = n_nodes
    if n_layout != n_nodes and n_layout in (from_tflops, from_tpgps):
        ngpu_used = n_layout
    if row.ngpu != ngpu_used:
        implied = [f"{k} imply ngpu={v}" for k, v in (("tflops/sps", from_tflops), ("tpgps/sps", from_tpgps)) if v]
        flags.append(
            f"ngpu={row.ngpu} but nodes*12 = {n_nodes}, pp*dp*tp = {n_layout}"
            + (f"; {', '.join(implied)}" if implied else "")
            + f"; the arithmetic supports ngpu={ngpu_used}"
        )

    tflops = tflops_tol = tpgps = tpgps_tol = None
    if row.sps is not None and row.sps <= 0:
        flags.append(f"sps={row.sps:g} is not positive")
    elif row.sps is not None:
        tflops = row.sps * f / ngpu_used / 1e12
        tpgps = row.sps * row.seq / ngpu_used
        tflops_tol, tpgps_tol = _tol(tflops, row), _tol(tpgps, row)
        for name, pub, rec, tol in (("tflops", row.tflops, tflops, tflops_tol), ("tpgps", row.tpgps, tpgps, tpgps_tol)):
            if pub is not None and abs(rec - pub) > tol:
                flags.append(
                    f"{name}={pub:g} but sps*{'F' if name == 'tflops' else 'seq'}/ngpu = {rec:.3f} "
                    f"({row.flops_formula + ', ' if name == 'tflops' else ''}seq {row.seq}, ngpu {ngpu_used}; "
                    f"off by {rec - pub:+.3f}, tolerance {tol:.3f})"
                )
    elif row.status == "ok":
        flags.append("status ok but no sps: nothing to check the derived cells against")
    if row.sps is None and (row.tflops is not None or row.tpgps is not None):
        flags.append("tflops/tpgps given without sps")

    return RowCheck(
        row=row, layout=layout(row), gbs=gbs, ngpu_nodes=n_nodes, ngpu_layout=n_layout, ngpu_used=ngpu_used,
        ngpu_from_tflops=from_tflops, ngpu_from_tpgps=from_tpgps, flops_per_sample=f,
        tflops=tflops, tflops_tol=tflops_tol, tpgps=tpgps, tpgps_tol=tpgps_tol, flags=flags,
    )  # fmt: skip


def check_all(rows: Iterable[Row]) -> list[RowCheck]:
    return [check_row(r) for r in rows]


def tflops_column(formula: str, seq: int | None = None) -> str:
    """Column name that carries the formula and the sequence length, so figures never mix unlabelled.

    ``seq=None`` is the normalised column (each row's own seq); a number is the what-if column."""
    return f"tflops[{formula},own seq]" if seq is None else f"what-if tflops[{formula},seq={seq}]"


def mfu_column(formula: str, seq: int | None = None) -> str:
    return tflops_column(formula, seq).replace("tflops[", "mfu[")


def normalise(rows: Sequence[Row], formula: str = "megatron_lm", what_if_seq: int | None = None
              ) -> list[dict[str, Any]]:
    """Every row's model TFLOPS/tile and MFU under one formula, at the seq the row ran at, beside its published
    figures: the row's own work, counted one way, so rows published under different formulas or run at
    different seqs compare. Only the FLOP count changes: sps stays as measured, NGPU is the one the arithmetic
    supports. Rows without sps get None.

    ``what_if_seq`` adds two more columns, labelled ``what-if``: the same samples/s credited with the FLOPs of
    samples ``what_if_seq`` tokens long. No run did that work; it answers "what would this throughput be worth
    at another seq", not how fast a run was.
    """
    if formula not in FORMULAS:
        raise ValueError(f"unknown flops formula {formula!r}; use one of {', '.join(FORMULAS)}")
    if what_if_seq is not None and what_if_seq <= 0:
        raise ValueError(f"what-if seq {what_if_seq} is not positive")
    out: list[dict[str, Any]] = []
    for c in check_all(rows):
        r = c.row
        d: dict[str, Any] = {
            "run": r.run, "model": r.model, "layout": c.layout, "nodes": r.nodes, "ngpu": c.ngpu_used,
            "gas": r.gas, "ackpt": r.ackpt, "status": r.status, "sps": r.sps,
            "formula published": r.flops_formula, "seq": r.seq,
            "tflops published": r.tflops, "tpgps published": r.tpgps,
        }  # fmt: skip
        for seq in (None,) if what_if_seq is None else (None, what_if_seq):
            f = flops_per_sample(r.model, formula, r.seq if seq is None else seq, r.ackpt)
            tflops = None if r.sps is None else r.sps * f / c.ngpu_used / 1e12
            d[tflops_column(formula, seq)] = tflops
            d[mfu_column(formula, seq)] = None if tflops is None else tflops / PEAK_TFLOPS_BF16
        out.append(d)
    return out


# ----------------------------------------------------------------------------- rendering
def _fmt(v: float | int | None, nd: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


_TABLE_HEAD = (
    "run", "model", "layout", "nodes", "ngpu pub", "ngpu calc", "GBS pub", "GBS calc", "GAS", "formula", "seq",
    "sps", "TFLOPS pub", "TFLOPS calc", "tok/GPU/s pub", "tok/GPU/s calc", "status", "flags",
)  # fmt: skip


def _table_rows(checks: Sequence[RowCheck]) -> list[list[str]]:
    out = []
    for c in checks:
        r = c.row
        out.append([
            r.run, r.model, c.layout, str(r.nodes), str(r.ngpu), str(c.ngpu_used), str(r.gbs), str(c.gbs), str(r.gas),
            r.flops_formula, str(r.seq), _fmt(r.sps, 3), _fmt(r.tflops), _fmt(c.tflops), _fmt(r.tpgps, 3),
            _fmt(c.tpgps, 3), r.status, "; ".join(c.flags) or "ok",
        ])  # fmt: skip
    return out


def render_markdown(checks: Sequence[RowCheck]) -> str:
    """Markdown table: published vs recomputed cells of every row, with its flags."""
    n_bad = sum(not c.ok for c in checks)
    lines = [
        "| " + " | ".join(_TABLE_HEAD) + " |",
        "|" + "|".join("---" for _ in _TABLE_HEAD) + "|",
    ]
    for cells in _table_rows(checks):
        lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
    lines.append("")
    lines.append(
        f"{len(checks)} rows, {n_bad} flagged. Recomputed from sps under each row's own formula and seq; "
        f"a cell is flagged when |calc - pub| > {BASE_TOL} + calc/sps x half of sps's last digit."
    )
    return "\n".join(lines) + "\n"


def render_normalised_markdown(table: Sequence[dict[str, Any]]) -> str:
    if not table:
        return ""
    keys = list(table[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for d in table:
        cells = [_fmt(v, 3 if "mfu[" in k or k == "sps" else 2) if isinstance(v, float) else str(v)
                 for k, v in d.items()]  # fmt: skip
        lines.append("| " + " | ".join("–" if s == "None" else s for s in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_gas_sweep(rows: Sequence[Row], path: str | Path, formula: str = "megatron_lm") -> Path:
    """Model TFLOPS/tile (each row's own seq) vs GAS, one line per layout (and node count, checkpointing, and
    seq), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt

    col = tflops_column(formula)
    seqs = {r.seq for r in rows}
    series: dict[str, list[tuple[int, float]]] = {}
    for d in normalise(rows, formula):
        if d[col] is None:
            continue
        # A GAS sweep only means something at a fixed node count, checkpointing setting and seq.
        key = (f"{d['layout']}, {d['nodes']} nodes" + ("" if d["ackpt"] else ", no ckpt")
               + (f", seq {d['seq']}" if len(seqs) > 1 else ""))
        series.setdefault(key, []).append((d["gas"], d[col]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([g for g, _ in pts], [t for _, t in pts], marker="o", label=key)
    ax.set_xscale("log", base=2)
    gas_values = sorted({g for pts in series.values() for g, _ in pts})
    ax.set_xticks(gas_values, [str(g) for g in gas_values])
    ax.minorticks_off()
    ax.set_xlabel("gradient accumulation steps (GAS)")
    ax.set_ylabel(f"model TFLOPS/tile ({formula}, each run's own seq)")
    ax.set_title("AuroraGPT study: TFLOPS/tile vs GAS per layout")
    ax.grid(True, which="both", alpha=0.3)
    sec = ax.secondary_yaxis("right", functions=(lambda t: 100 * t / PEAK_TFLOPS_BF16,
                                                 lambda p: p * PEAK_TFLOPS_BF16 / 100))  # fmt: skip
    sec.set_ylabel(f"% of {PEAK_TFLOPS_BF16:g} TFLOPS bf16 peak")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_CONSOLE_HEAD = ("run", "layout", "nodes", "ngpu", "GAS", "sps", "TFLOPS pub", "calc", "tok/GPU/s pub", "calc", "check")


def _print_table(checks: Sequence[RowCheck]) -> None:
    # A narrower table than the markdown one, so it fits a terminal; flags are listed below it in full.
    rows = []
    for i, c in enumerate(checks, start=1):
        r = c.row
        rows.append([
            r.run, c.layout, str(r.nodes), str(r.ngpu), str(r.gas), _fmt(r.sps, 3), _fmt(r.tflops), _fmt(c.tflops),
            _fmt(r.tpgps, 3), _fmt(c.tpgps, 3), "ok" if c.ok else f"FLAG {i}",
        ])  # fmt: skip
    notes = [f"FLAG {i} {c.row.run} ({c.row.where}): {f}" for i, c in enumerate(checks, start=1) for f in c.flags]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        print("\t".join(_CONSOLE_HEAD))
        for cells in rows:
            print("\t".join(cells))
        print("\n".join(notes))
        return
    table = Table(title="AuroraGPT reference runs: published vs recomputed (tflops under each row's formula)")
    for h in _CONSOLE_HEAD:
        table.add_column(h, no_wrap=h != "layout", justify="left" if h in ("run", "layout", "check") else "right")
    for c, cells in zip(checks, rows, strict=True):
        table.add_row(*cells, style=None if c.ok else "red")
    console = Console()
    console.print(table)
    for n in notes:
        console.print(n, style="red", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m compare.reference", description="Check the study's published table against its arithmetic."
    )
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="reference CSV")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for reference.md/.json/.png")
    ap.add_argument("--formula", choices=FORMULAS, default="megatron_lm", help="formula of the normalised column")
    ap.add_argument("--what-if-seq", "--seq", dest="what_if_seq", type=int, default=None, metavar="N",
                    help="add what-if columns: each row's samples/s credited with the FLOPs of seq-N samples "
                         "(the normalised column always uses the seq each run ran at)")
    ap.add_argument("--assert", dest="assert_", action="store_true", help="exit 1 if any row is flagged")
    args = ap.parse_args(argv)

    try:
        rows = load_reference(args.reference)
    except (OSError, ReferenceFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checks = check_all(rows)
    if args.what_if_seq is not None and args.what_if_seq <= 0:
        print(f"error: --what-if-seq {args.what_if_seq} is not positive; give a sequence length such as 8192",
              file=sys.stderr)
        return 2
    table = normalise(rows, args.formula, args.what_if_seq)
    _print_table(checks)

    args.out.mkdir(parents=True, exist_ok=True)
    md = (
        f"# Reference runs: {args.reference}\n\n## Published vs recomputed\n\n{render_markdown(checks)}\n"
        f"## Normalised: model TFLOPS/tile and MFU under {args.formula} at each run's own seq\n\n"
        + (f"What-if columns: the same samples/s credited with {args.formula} FLOPs of seq-{args.what_if_seq} "
           "samples (no run did that work).\n\n" if args.what_if_seq is not None else "")
        + render_normalised_markdown(table)
    )
    (args.out / "reference.md").write_text(md)
    payload = {
        "reference": str(args.reference),
        "formula": args.formula,
        "what_if_seq": args.what_if_seq,
        "flagged": sum(not c.ok for c in checks),
        "checks": [dataclasses.asdict(c) | {"ok": c.ok} for c in checks],
        "normalised": table,
    }
    (args.out / "reference.json").write_text(json.dumps(payload, indent=1) + "\n")
    png = plot_gas_sweep(rows, args.out / "reference_gas_sweep.png", args.formula)
    n_bad = payload["flagged"]
    print(f"{len(checks)} rows, {n_bad} flagged; wrote {args.out / 'reference.md'}, reference.json, {png.name}")
    return 1 if (n_bad and args.assert_) else 0


if __name__ == "__main__":
    sys.exit(main())
