"""benchmarks/matmul_rates.py measures both frameworks' kernels in every dtype and round it names."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import matmul_rates


def test_matmul_rates_alternates_both_frameworks_in_both_dtypes(capsys):
    rates = matmul_rates.main(["--size", "64", "--rounds", "2", "--calls", "2"])
    assert set(rates) == {"jax fp32", "torch fp32", "jax bf16", "torch bf16"}
    assert all(len(v) == 2 and all(r > 0 for r in v) for v in rates.values())
    out = capsys.readouterr().out
    assert "round 2/2" in out and "jax/torch fp32:" in out and "jax/torch bf16:" in out
