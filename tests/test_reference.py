"""The study's published table against its arithmetic (compare.reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compare import reference as ref
from configs.schema import load_config

SHIPPED = ref.DEFAULT_REFERENCE
HEADER = ",".join(ref.COLUMNS)
# wild-bee-2131 as published: 8 nodes, PP 8 x DP 6 x TP 2, GAS 32.
WILD_BEE = "wild-bee-2131,llama2-70b,8,96,8,6,2,1,1,0,1,32,192,true,4096,megatron_lm,64.02,3.376,144.037,ok"


def _write(tmp_path: Path, *rows: str, name: str = "ref.csv") -> Path:
    p = tmp_path / name
    p.write_text("# a comment line\n" + HEADER + "\n" + "\n".join(rows) + "\n")
    return p


def _one(tmp_path: Path, row: str) -> ref.RowCheck:
    (r,) = ref.load_reference(_write(tmp_path, row))
    return ref.check_row(r)


# ----------------------------------------------------------------------------- the shipped table
def test_shipped_csv_parses_with_types_and_empty_cells():
    rows = ref.load_reference(SHIPPED)
    assert len(rows) == 17
    by_run = {r.run: r for r in rows}
    oom, hang = by_run["chocolate-meadow-2125"], by_run["zero3-hpz-4n"]
    assert (oom.status, oom.tflops, oom.sps, oom.tpgps) == ("oom", None, None, None)
    assert (hang.status, hang.sps) == ("hang", None)
    wb = by_run["wild-bee-2131"]
    assert (wb.nodes, wb.pp, wb.dp, wb.tp, wb.gas, wb.gbs, wb.ackpt) == (8, 8, 6, 2, 32, 192, True)
    assert (wb.tflops, wb.sps, wb.tpgps, wb.sps_decimals) == (64.02, 3.376, 144.037, 3)
    assert by_run["proud-frog-2153"].ackpt is False
    # line numbers count the comment header, so errors and flags point at the real line
    assert SHIPPED.read_text().splitlines()[wb.line - 1].startswith("wild-bee-2131,")


def test_every_published_cell_reproduces_from_sps():
    checked = 0
    for c in ref.check_all(ref.load_reference(SHIPPED)):
        r = c.row
        assert c.ok, (r.run, c.flags)
        assert c.gbs == r.gbs and c.ngpu_used == r.ngpu == r.nodes * 12 == r.pp * r.dp * r.tp
        if r.status in ("oom", "hang"):
            assert r.sps is None and c.tflops is None  # parsed, nothing to reproduce
            continue
        assert r.sps is not None and r.tflops is not None and r.tpgps is not None
        assert c.tflops is not None and c.tpgps is not None and c.tflops_tol and c.tpgps_tol
        # TFLOPS reproduce to 0.01 outright; tokens/GPU/s within 0.01 + the propagated rounding of sps.
        assert abs(c.tflops - r.tflops) <= 0.01, r.run
        assert abs(c.tpgps - r.tpgps) <= c.tpgps_tol, r.run
        # the tolerance stays tight: 0.01 + (value/sps) * 0.0005 for 96-tile rows
        assert c.tflops_tol == pytest.approx(0.01 + c.tflops / r.sps * 0.0005)
        assert c.tpgps_tol < 0.04 and c.tflops_tol < 0.025
        assert c.ngpu_from_tflops == c.ngpu_from_tpgps == r.ngpu
        checked += 1
    assert checked == 15


def test_layout_names_of_the_three_sweeps():
    names = {ref.layout(r) for r in ref.load_reference(SHIPPED) if r.sps is not None}
    assert names == {"PP+ZeRO-1 TP=2", "ZeRO-3+hpZ", "TP=6+ZeRO-2"}


# ----------------------------------------------------------------------------- planted inconsistencies
def test_planted_16_node_row_with_ngpu_384_is_flagged_as_192(tmp_path):
    # A 16-node PP=16 run, its tflops/tpgps computed with the true 192 tiles, its ngpu cell saying 384.
    sps = 6.0
    f = load_config("llama2-70b").model.flops_per_sample(4096)
    tflops, tpgps = round(sps * f / 192 / 1e12, 2), round(sps * 4096 / 192, 3)
    c = _one(tmp_path, f"big,llama2-70b,16,384,16,6,2,1,1,0,1,32,192,true,4096,megatron_lm,{tflops},{sps},{tpgps},ok")
    assert c.ngpu_used == 192 and c.ngpu_from_tflops == 192 and c.ngpu_from_tpgps == 192
    assert len(c.flags) == 1, c.flags  # only the ngpu cell is wrong; tflops/tpgps agree with 192
    assert "ngpu=384" in c.flags[0] and "tflops/sps imply ngpu=192" in c.flags[0]
    assert "the arithmetic supports ngpu=192" in c.flags[0]


def test_planted_tflops_off_by_one_is_flagged(tmp_path):
    c = _one(tmp_path, WILD_BEE.replace(",64.02,", ",65.02,"))
    assert len(c.flags) == 1, c.flags
    assert c.flags[0].startswith("tflops=65.02 but sps*F/ngpu = 64.026")
    assert "off by -0.994" in c.flags[0]


def test_small_tpgps_error_beyond_rounding_is_flagged(tmp_path):
    # 0.05 exceeds 0.01 + 144.04/3.376*0.0005 = 0.031: a real discrepancy, not rounding.
    c = _one(tmp_path, WILD_BEE.replace(",144.037,", ",144.087,"))
    assert len(c.flags) == 1 and c.flags[0].startswith("tpgps=144.087"), c.flags


def test_gbs_and_layout_mismatches_are_flagged(tmp_path):
    c = _one(tmp_path, WILD_BEE.replace(",32,192,", ",32,96,"))
    assert c.flags == ["gbs=96 but mbs*gas*dp = 1*32*6 = 192"]
    c = _one(tmp_path, WILD_BEE.replace(",8,96,8,6,2,", ",8,96,8,6,1,"))  # pp*dp*tp = 48 on 8 nodes
    assert any("pp*dp*tp = 8*6*1 = 48" in f for f in c.flags), c.flags

    # nodes says 16, but the layout (8*6*2) and the measured cells agree on 96: the nodes cell is the odd one out
    c = _one(tmp_path, WILD_BEE.replace("llama2-70b,8,96,", "llama2-70b,16,96,"))
    assert c.ngpu_used == 96 and c.flags == ["nodes*12 = 192 but pp*dp*tp = 8*6*2 = 96"]


def test_tflops_cell_computed_with_the_wrong_ngpu_is_flagged(tmp_path):
    # ngpu and tflops both say 384 on a 16-node PP16xDP6xTP2 row: the tflops cell is half what it should be.
    f = load_config("llama2-70b").model.flops_per_sample(4096)
    bad = round(6.0 * f / 384 / 1e12, 2)
    c = _one(tmp_path, f"big,llama2-70b,16,384,16,6,2,1,1,0,1,32,192,true,4096,megatron_lm,{bad},6.0,128.0,ok")
    assert c.ngpu_used == 192 and c.ngpu_from_tflops == 384
    assert any("tflops/sps imply ngpu=384" in x for x in c.flags)
    assert any(x.startswith(f"tflops={bad:g}") for x in c.flags)


# ----------------------------------------------------------------------------- formulas and normalisation
def test_legacy_formula_is_1_265x_megatron_lm_for_the_70b_with_checkpointing():
    # The study's legacy tables used seq 8192; at that seq the ratio is 1.265 (at 4096 it is 1.260).
    lm = ref.flops_per_sample("llama2-70b", "megatron_lm", 8192, ackpt=True)
    legacy = ref.flops_per_sample("llama2-70b", "megatron_ds_legacy", 8192, ackpt=True)
    assert round(legacy / lm, 3) == 1.265
    lm4, legacy4 = (ref.flops_per_sample("llama2-70b", f, 4096, ackpt=True) for f in ref.FORMULAS)
    assert round(legacy4 / lm4, 3) == 1.260
    # without checkpointing the legacy formula drops the recompute pass: c = 3 instead of 4
    no_ckpt = ref.flops_per_sample("llama2-70b", "megatron_ds_legacy", 8192, ackpt=False)
    assert no_ckpt / legacy == pytest.approx(0.75)


def test_normalise_labels_the_formula_and_keeps_the_published_numbers():
    rows = ref.load_reference(SHIPPED)
    lm = {d["run"]: d for d in ref.normalise(rows)}
    legacy = {d["run"]: d for d in ref.normalise(rows, "megatron_ds_legacy")}
    wb_lm, wb_legacy = lm["wild-bee-2131"], legacy["wild-bee-2131"]
    assert wb_lm["tflops published"] == 64.02 and wb_lm["formula published"] == "megatron_lm"
    assert wb_lm["seq"] == 4096 and wb_lm["tflops[megatron_lm,own seq]"] == pytest.approx(64.02, abs=0.01)
    assert wb_lm["mfu[megatron_lm,own seq]"] == pytest.approx(64.02 / 298.0, abs=1e-4)
    assert "tflops[megatron_lm,own seq]" not in wb_legacy
    assert not any(k.startswith("what-if") for k in wb_lm)  # only when asked for
    m = load_config("llama2-70b").model
    want = 3.376 * m.flops_per_sample_legacy(4096, True) / 96 / 1e12
    assert wb_legacy["tflops[megatron_ds_legacy,own seq]"] == pytest.approx(want)
    assert lm["zero3-hpz-4n"]["tflops[megatron_lm,own seq]"] is None
    # the 42B uses its own padded vocab (32256) through its preset
    rf = lm["royal-forest-2135"]
    assert rf["tflops[megatron_lm,own seq]"] == pytest.approx(19.76, abs=0.01)
    with pytest.raises(ValueError, match="unknown flops formula"):
        ref.normalise(rows, "ds_tflops")


def _row_at(model: str, seq: int, formula: str, tflops: float) -> str:
    """A synthetic, self-consistent row: 8 nodes, sps chosen so that the published tflops is exact."""
    tp, dp = (6, 16) if model == "auroragpt-42b-tp6" else (1, 96)
    sps = round(tflops * 96e12 / ref.flops_per_sample(model, formula, seq, ackpt=True), 3)
    tflops = sps * ref.flops_per_sample(model, formula, seq, ackpt=True) / 96e12
    return (f"r-{model}-{seq}-{formula},{model},8,96,1,{dp},{tp},3,1,0,1,1,{dp},true,{seq},{formula},"
            f"{tflops:.2f},{sps:.3f},{sps * seq / 96:.3f},ok")


def test_normalised_column_is_each_rows_own_work_under_megatron_lm(tmp_path):
    """Rows at seq 4096 and 8192, published under both formulas: the normalised column counts each row's own
    work (its own seq) under Megatron-LM, so a Megatron-LM row keeps its published figure at either seq and a
    legacy row is divided by the legacy/Megatron-LM ratio at its seq (1.26 with checkpointing)."""
    specs = [(m, seq, f) for m in ("llama2-70b", "auroragpt-42b-tp6") for seq in (4096, 8192) for f in ref.FORMULAS]
    rows = ref.load_reference(_write(tmp_path, *(_row_at(m, seq, f, 98.5) for m, seq, f in specs)))
    assert all(c.ok for c in ref.check_all(rows))
    table = {(d["model"], d["seq"], d["formula published"]): d for d in ref.normalise(rows)}
    col = "tflops[megatron_lm,own seq]"
    for m, seq, f in specs:
        d = table[m, seq, f]
        if f == "megatron_lm":
            assert d[col] == pytest.approx(d["tflops published"], abs=0.01)
        else:
            lm, legacy = (ref.flops_per_sample(m, g, seq, ackpt=True) for g in ("megatron_lm", "megatron_ds_legacy"))
            assert d[col] == pytest.approx(d["tflops published"] * lm / legacy, abs=0.01)
    # the study's legacy tables: seq 8192, 98.5 TFLOPS/tile published -> 78.1 (42B) / 77.9 (70B) model-TFLOPS
    assert round(table["auroragpt-42b-tp6", 8192, "megatron_ds_legacy"][col], 1) == 78.1
    assert round(table["llama2-70b", 8192, "megatron_ds_legacy"][col], 1) == 77.9
    # counting a seq-8192 row's samples as seq-4096 ones would credit it with less than half its work
    d8 = table["llama2-70b", 8192, "megatron_lm"]
    at_4096 = d8["sps"] * ref.flops_per_sample("llama2-70b", "megatron_lm", 4096, ackpt=True) / 96e12
    assert d8[col] / at_4096 > 2.0


def test_what_if_seq_is_extra_labelled_columns(tmp_path):
    rows = ref.load_reference(_write(tmp_path, _row_at("llama2-70b", 4096, "megatron_lm", 50.0),
                                     _row_at("llama2-70b", 8192, "megatron_lm", 50.0)))
    d4, d8 = ref.normalise(rows, what_if_seq=8192)
    m = load_config("llama2-70b").model
    for d in (d4, d8):
        assert d["tflops[megatron_lm,own seq]"] == pytest.approx(50.0, abs=0.01)  # unchanged by the what-if
        assert d["what-if tflops[megatron_lm,seq=8192]"] == pytest.approx(d["sps"] * m.flops_per_sample(8192) / 96e12)
        assert d["what-if mfu[megatron_lm,seq=8192]"] == pytest.approx(d["what-if tflops[megatron_lm,seq=8192]"] / 298)
    assert d4["what-if tflops[megatron_lm,seq=8192]"] / 50.0 == pytest.approx(
        m.flops_per_sample(8192) / m.flops_per_sample(4096), rel=1e-3)
    assert d8["what-if tflops[megatron_lm,seq=8192]"] == pytest.approx(50.0, abs=0.01)
    with pytest.raises(ValueError, match="what-if seq 0 is not positive"):
        ref.normalise(rows, what_if_seq=0)


# ----------------------------------------------------------------------------- malformed files
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.replace(",ok", ",ok,extra"), "21 columns, the header has 20"),
        (lambda s: s.replace(",64.02,", ",64.o2,"), "column 'tflops' = '64.o2' is not a number"),
        (lambda s: s.replace(",32,192,", ",32,19x,"), "column 'gbs' = '19x' is not an integer"),
        (lambda s: s.replace("llama2-70b", "llama3-70b"), "unknown model 'llama3-70b'"),
        (lambda s: s.replace("megatron_lm", "ds_tflops"), "unknown flops_formula 'ds_tflops'"),
        (lambda s: s.replace(",true,", ",yes please,"), "column 'ackpt' = 'yes please' is not true or false"),
        (lambda s: s.replace(",4096,", ",,"), "column 'seq' is empty"),
    ],
)
def test_malformed_row_errors_name_file_and_line(tmp_path, mutate, message):
    good = "glamorous-darkness-2126,llama2-70b,8,96,8,6,2,1,1,0,1,1,6,true,4096,megatron_lm,10.26,0.541,23.084,ok"
    p = _write(tmp_path, good, mutate(WILD_BEE))  # line 1 comment, 2 header, 3 good, 4 bad
    with pytest.raises(ref.ReferenceFormatError) as e:
        ref.load_reference(p)
    assert f"{p}:4:" in str(e.value) and message in str(e.value), str(e.value)


def test_bad_header_is_reported(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("# c\n" + HEADER.replace("tpgps", "tokens") + "\n" + WILD_BEE + "\n")
    with pytest.raises(ref.ReferenceFormatError, match=rf"{p}:2: header .*missing tpgps; unknown tokens"):
        ref.load_reference(p)


# ----------------------------------------------------------------------------- rendering and the CLI
def test_render_markdown_shows_original_recomputed_and_flags(tmp_path):
    checks = ref.check_all(ref.load_reference(_write(tmp_path, WILD_BEE, WILD_BEE.replace(",64.02,", ",65.02,"))))
    md = ref.render_markdown(checks)
    lines = [ln for ln in md.splitlines() if ln.startswith("| wild-bee-2131")]
    assert len(lines) == 2
    assert "| 64.02 | 64.03 |" in lines[0] and lines[0].endswith("| ok |")
    assert "| 65.02 | 64.03 |" in lines[1] and "off by -0.994" in lines[1]
    assert "2 rows, 1 flagged" in md


def test_main_writes_md_json_png(tmp_path, capsys):
    out = tmp_path / "out"
    assert ref.main(["--reference", str(SHIPPED), "--out", str(out), "--assert"]) == 0
    md = (out / "reference.md").read_text()
    assert "wild-bee-2131" in md and "tflops[megatron_lm,own seq]" in md and "what-if" not in md
    data = json.loads((out / "reference.json").read_text())
    assert data["flagged"] == 0 and len(data["checks"]) == 17 and data["formula"] == "megatron_lm"
    assert data["checks"][7]["row"]["run"] == "wild-bee-2131" and data["checks"][7]["ok"] is True
    png = (out / "reference_gas_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "17 rows, 0 flagged" in capsys.readouterr().out


def test_main_exit_codes(tmp_path):
    bad = _write(tmp_path, WILD_BEE.replace(",64.02,", ",65.02,"))
    assert ref.main(["--reference", str(bad), "--out", str(tmp_path / "a")]) == 0
    assert ref.main(["--reference", str(bad), "--out", str(tmp_path / "b"), "--assert"]) == 1
    data = json.loads((tmp_path / "b" / "reference.json").read_text())
    assert data["flagged"] == 1 and data["checks"][0]["ok"] is False
    args = ["--reference", str(bad), "--out", str(tmp_path / "c"), "--formula", "megatron_ds_legacy",
            "--what-if-seq", "8192"]
    assert ref.main(args) == 0
    md = (tmp_path / "c" / "reference.md").read_text()
    assert "tflops[megatron_ds_legacy,own seq]" in md and "what-if tflops[megatron_ds_legacy,seq=8192]" in md
    assert "no run did that work" in md
    assert ref.main(["--reference", str(bad), "--out", str(tmp_path / "e"), "--what-if-seq", "0"]) == 2
    broken = _write(tmp_path, WILD_BEE.replace("llama2-70b", "nope"), name="broken.csv")
    assert ref.main(["--reference", str(broken), "--out", str(tmp_path / "d")]) == 2
