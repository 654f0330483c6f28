"""benchmarks/gpu_sweep.py: the table it prints after a lease, and its refusal of unknown variants (no GPU needed)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("gpu_sweep", Path(__file__).parents[1] / "benchmarks" / "gpu_sweep.py")
gpu_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_sweep)


def _r(step_s, tflop_per_step=100.0, matmul_tflops=800.0, peak=989e12):
    flops = tflop_per_step * 1e12 / step_s
    return {"step_s": step_s, "model_tflops": flops / 1e12, "mfu_vs_peak": flops / peak,
            "mfu_vs_matmul": flops / (matmul_tflops * 1e12), "matmul_tflops": matmul_tflops,
            "compile_s": 10.0, "peak_bytes": 34 * 2**30}


def test_table_ratios_are_measured_step_times():
    res = {"jax": _r(0.2), "torch": _r(0.3), "torch.compile": _r(0.25), "jax:scan": {"error": "exit 1 after 3 s"}}
    rows = {line.split("|")[1].strip(): line for line in gpu_sweep.table(res).splitlines()[2:]}
    cells = [c.strip() for c in rows["jax"].split("|")[1:-1]]
    assert cells[:4] == ["jax", "200", "500", "50.6 %"]
    assert cells[4] == "62.5 % (800)"
    assert cells[7:] == ["1.50×", "1.25×"]  # torch / jax and torch.compile / jax step times
    assert [c.strip() for c in rows["torch"].split("|")[8:10]] == ["", ""]  # no ratio of a reference to itself
    assert "exit 1 after 3 s" in rows["jax:scan"]


def test_unknown_variant_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        gpu_sweep.main(["--variants", "jax,jax:typo", "--out-dir", "unused"])
    err = capsys.readouterr().err
    assert "jax:typo" in err and "jax:mm=fp32" in err


def test_torch_checkpointed_blocks_give_the_same_gradients():
    """bench_gpu's torch side under parallel.remat recomputes each block in the backward: same loss and
    gradients as the plain model, same parameter names, and the forward really runs again in the backward."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_gpu

    from configs import load_config
    from torch_ref.model import Llama, init_torch

    cfg = load_config("tiny")
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))

    def grads(remat: bool):
        model = init_torch(Llama(cfg.model), 0)
        if remat:
            bench_gpu.checkpoint_blocks(model)
        calls = []
        model.layers[0].attn_norm.register_forward_hook(lambda *a: calls.append(1))
        model(tokens).float().logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    (plain, n_plain), (remat, n_remat) = grads(False), grads(True)
    assert plain.keys() == remat.keys()
    for n in plain:
        torch.testing.assert_close(remat[n], plain[n], rtol=1e-5, atol=1e-6)
    assert (n_plain, n_remat) == (1, 2)
