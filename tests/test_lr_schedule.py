"""One warmup + cosine schedule: configs.lr_at (Python floats: torch_ref, the metrics) and the JAX trainer's optax
schedule are the same function, and both follow Megatron-DeepSpeed's OptimizerParamScheduler step for step."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from configs import load_config, lr_at
from jax_impl.trainer import lr_schedule


class MegatronLR:
    """Megatron-DeepSpeed's OptimizerParamScheduler (megatron/optimizer_param_scheduler.py), iteration-based runs,
    restated: it counts *samples* (each optimizer step adds the global batch), warmup is
    ``lr_warmup_fraction * lr_decay_steps`` samples (a float), the constructor sets the lr for count 0 and the
    training loop advances the count after every optimizer step, so step k (1-based) runs at count (k-1) x gbs."""

    def __init__(self, max_lr: float, min_lr: float, warmup_frac: float, decay_iters: int, gbs: int, style: str):
        self.max_lr, self.min_lr, self.style = max_lr, min_lr, style
        self.decay = decay_iters * gbs
        self.warmup = warmup_frac * self.decay
        self.num_steps = 0
        self.lr = self.get_lr()

    def get_lr(self) -> float:
        if self.warmup > 0 and self.num_steps <= self.warmup:
            return self.max_lr * float(self.num_steps) / float(self.warmup)
        if self.style == "constant":
            return self.max_lr
        if self.num_steps > self.decay:
            return self.min_lr
        ratio = float(self.num_steps - self.warmup) / float(self.decay - self.warmup)
        assert 0.0 <= ratio <= 1.0
        return self.min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (self.max_lr - self.min_lr)

    def step(self, increment: int) -> None:
        self.num_steps += increment
        self.lr = self.get_lr()


def megatron_lrs(cfg, n: int, gbs: int) -> list[float]:
    """The lr each of the first n optimizer steps runs with, in order."""
    o = cfg.optim
    sched = MegatronLR(o.lr, o.min_lr, o.warmup_frac, o.decay_steps or cfg.train.steps, gbs, o.schedule)
    out = []
    for _ in range(n):
        out.append(sched.lr)  # the optimizer step runs with the current lr ...
        sched.step(gbs)  # ... then the scheduler advances (Megatron's train_step)
    return out


CASES = {
    "cosine": {"train.steps": 100, "optim.warmup_frac": 0.05, "optim.lr": 3e-4, "optim.min_lr": 3e-5},
    "fractional-warmup": {"train.steps": 37, "optim.warmup_frac": 0.1, "optim.lr": 1e-3, "optim.min_lr": 0.0},
    "past-decay": {"train.steps": 30, "optim.decay_steps": 20, "optim.warmup_frac": 0.1, "optim.lr": 1.0,
                   "optim.min_lr": 0.1},
    "no-warmup": {"train.steps": 25, "optim.warmup_frac": 0.0, "optim.lr": 2e-4, "optim.min_lr": 2e-5},
    "constant": {"train.steps": 40, "optim.schedule": "constant", "optim.warmup_frac": 0.25, "optim.lr": 5e-4},
}


@pytest.mark.parametrize("gbs", [1, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_lr_at_is_megatrons_schedule(case, gbs):
    cfg = load_config("tiny", CASES[case])
    n = cfg.train.steps + 5  # past the end too (min_lr, or lr for constant)
    want = megatron_lrs(cfg, n, gbs)
    got = [lr_at(cfg, k) for k in range(n)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18), case
    if cfg.optim.warmup_frac > 0:
        assert got[0] == 0.0  # the first optimizer step runs at lr 0


@pytest.mark.parametrize("case", list(CASES))
def test_jax_schedule_is_lr_at(case):
    """optax calls the schedule with the count of updates already applied (0 for the first), the same 0-based
    step index as lr_at; fp32 in the step, so equal to fp32 rounding."""
    cfg = load_config("tiny", CASES[case])
    sched = lr_schedule(cfg)
    steps = np.arange(cfg.train.steps + 5)
    got = np.array([float(sched(jnp.asarray(k, jnp.int32))) for k in steps])
    want = np.array([lr_at(cfg, int(k)) for k in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7 * cfg.optim.lr)  # fp32 rounding
    assert np.asarray(sched(jnp.asarray(steps, jnp.int32))).dtype == np.float32
