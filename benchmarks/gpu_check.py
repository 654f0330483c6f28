"""GPU correctness check: JAX and torch on the same weights and batch, and a causality probe.

    python benchmarks/gpu_check.py

Both frameworks start from the JAX init (converted exactly with torch_ref.convert) and train 6
steps on one fixed batch; per-step losses are printed side by side for JAX bf16 with XLA attention,
JAX bf16 with cuDNN attention and torch bf16 autocast (SDPA). The probe changes the last token of
every sequence: logits at earlier positions must not move (causal attention).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OVER = {"model.n_layers": 2, "model.hidden": 512, "model.n_heads": 8, "model.n_kv_heads": 4,
        "model.ffn_hidden": 1408, "data.seq_len": 512, "parallel.mbs": 4, "train.steps": 6}


def jax_run(attn_impl: str, batch: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp

    from configs import load_config
    from jax_impl.model import forward
    from jax_impl.sharding import batch_sharding, make_mesh
    from jax_impl.trainer import Trainer

    cfg = load_config("gpu-1b", {**OVER, "jax.attn_impl": attn_impl})
    mesh = make_mesh(cfg.mesh_shape(1), jax.devices()[:1])
    tr = Trainer.build(cfg, mesh)
    params, opt = tr.init_state()
    p0 = jax.tree.map(np.asarray, tr.logical_params(params))
    fwd = jax.jit(lambda p, t: forward(cfg.model, p, t, dtype=jnp.bfloat16, attn_impl=attn_impl))
    tok = batch[0, :, :-1]
    alt = tok.copy()
    alt[:, -1] = (alt[:, -1] + 1) % cfg.model.vocab_size
    a, b = np.asarray(fwd(params, tok)), np.asarray(fwd(params, alt))
    leak = float(np.abs(a[:, :-1] - b[:, :-1]).max())
    step = tr.compile_step()
    dev_batch = jax.device_put(batch, batch_sharding(mesh))
    losses = []
    for _ in range(cfg.train.steps):
        params, opt, m = step(params, opt, dev_batch)
        losses.append(float(m["loss"]))
    return {"losses": losses, "prefix_logit_change_when_last_token_changes": leak, "init": p0}


def torch_run(init: dict, batch: np.ndarray) -> dict:
    import torch
    import torch.nn.functional as F

    from configs import load_config, lr_at
    from torch_ref.convert import jax_to_torch
    from torch_ref.model import Llama

    cfg = load_config("gpu-1b", {**OVER, "jax.attn_impl": "xla"})
    model = Llama(cfg.model)
    model.load_state_dict(jax_to_torch(init))
    model = model.cuda()
    o = cfg.optim
    decay = [p for n, p in model.named_parameters() if not n.rsplit(".", 1)[0].endswith("norm")]
    no_decay = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[0].endswith("norm")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay,
                             "weight_decay": 0.0}], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    tok = torch.tensor(batch[0], device="cuda", dtype=torch.long)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        alt = tok[:, :-1].clone()
        alt[:, -1] = (alt[:, -1] + 1) % cfg.model.vocab_size
        leak = (model(tok[:, :-1])[:, :-1] - model(alt)[:, :-1]).abs().max().item()
    losses = []
    for i in range(cfg.train.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tok[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tok[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "prefix_logit_change_when_last_token_changes": leak}


def main() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 32000, (1, OVER["parallel.mbs"], OVER["data.seq_len"] + 1)).astype(np.int32)
    out = {}
    for impl in ("xla", "cudnn"):
        r = jax_run(impl, batch)
        init = r.pop("init")
        out[f"jax-{impl}"] = r
        print(f"jax-{impl}", json.dumps(r), flush=True)
    out["torch"] = torch_run(init, batch)
    print("torch", json.dumps(out["torch"]), flush=True)


if __name__ == "__main__":
    main()
