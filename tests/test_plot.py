"""`python -m compare.plot`: loss and learning rate of one or several runs as a PNG; trainers write loss.png."""

import json
from pathlib import Path

import pytest

from compare.plot import PlotError, figure, main, read_metrics, write_run_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(d: Path, steps: int = 10, loss0: float = 8.0) -> Path:
    d.mkdir(parents=True)
    rows = [{"step": s, "loss": loss0 - 0.1 * s, "lr": 1e-3 * min(1.0, s / 3)} for s in range(1, steps + 1)]
    rows[2]["lr"] = None  # a framework that cannot report a value writes None: skipped, not plotted
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    return d


def test_one_run_writes_loss_png_in_the_run_dir(tmp_path, capsys):
    run = _run(tmp_path / "r1")
    assert main([str(run)]) == 0
    out = run / "loss.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.strip() == str(out)


def test_several_runs_overlay_in_one_figure(tmp_path, monkeypatch):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b", steps=6, loss0=9.0)
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(b)]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    fig = figure([a, b])
    (loss_lines, lr_lines) = (ax.get_lines() for ax in fig.axes)
    assert [ln.get_label() for ln in loss_lines] == ["a", "b"]
    assert list(loss_lines[0].get_xdata()) == list(range(1, 11))  # step order, whatever the file order
    assert loss_lines[1].get_ydata()[0] == pytest.approx(8.9)
    assert 3 not in list(lr_lines[0].get_xdata())  # the None learning rate is left out


def test_out_flag(tmp_path):
    run = _run(tmp_path / "r")
    assert main([str(run), "--out", str(tmp_path / "figs" / "curve.png")]) == 0
    assert (tmp_path / "figs" / "curve.png").is_file()


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "has no steps"),
    ('{"step": 1, "loss": 2.0}\nnot json\n', "line 2 is not valid JSON"),
    ('{"loss": 2.0}\n', "has no 'step'"),
])
def test_bad_run_dir_is_a_message_and_exit_2(tmp_path, capsys, content, message):
    run = tmp_path / "r"
    if content is not None:
        run.mkdir()
        (run / "metrics.jsonl").write_text(content)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    with pytest.raises(PlotError):
        read_metrics(run)


def test_write_run_plot_never_raises(tmp_path, capsys):
    assert write_run_plot(tmp_path / "missing") is None
    assert "warning: no loss.png" in capsys.readouterr().err
    run = _run(tmp_path / "ok")
    assert write_run_plot(run) == run / "loss.png"
    assert f"loss curve: {run / 'loss.png'}" in capsys.readouterr().out


def test_jax_trainer_ends_with_loss_png(tmp_path, capsys):
    from jax_impl.train import main as train

    out = train(["--preset", "tiny", "--mesh", "data=1", "--steps", "2", "--out-dir", str(tmp_path),
                 "--name", "r", "--wandb", "disabled"])
    png = out["run_dir"] / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"loss curve: {png}" in capsys.readouterr().out


def test_torch_trainer_rank0_ends_with_loss_png(tmp_path, capfd):
    from torch_ref.train import main as train

    out = train(["--preset", "tiny", "--mesh", "data=1", "--zero", "1", "--steps", "2", "--out-dir", str(tmp_path),
                 "--name", "t", "--wandb", "disabled"])
    png = out["run_dir"] / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"loss curve: {png}" in capfd.readouterr().out  # printed by the rank-0 worker process
