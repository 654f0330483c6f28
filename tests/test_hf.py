"""Hugging Face Llama checkpoints in and out: a small random ``LlamaForCausalLM`` built here (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers  # a test-only dependency (pyproject [dev]); the model is built here, nothing is downloaded

from configs import load_config
from jax_impl.checkpoint import _cli, restore_numpy
from jax_impl.model import forward, init_params
from torch_ref.convert import jax_to_torch
from torch_ref.model import Llama as TorchLlama
from weightmap import hf

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=50000.0, max_position_embeddings=64)


def hf_model(**over) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**SMALL, **over})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    d = tmp_path_factory.mktemp("hf") / "llama-small"
    model = hf_model()
    model.save_pretrained(d)
    return d, model


TOKENS = np.array([[1, 5, 9, 33, 70, 2, 95, 40, 11, 0, 64, 8]], np.int32)


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS).long()).logits.float().numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_import_matches_transformers_logits_in_jax_and_torch_ref(saved, tmp_path, capsys):
    d, model = saved
    out = tmp_path / "ckpt"
    assert _cli(["import", "--from", "hf", str(d), str(out)]) == 0
    assert "imported 21 tensors" in capsys.readouterr().out
    params, meta = restore_numpy(out)
    cfg = load_config("tiny", {f"model.{k}": v for k, v in meta["config"]["model"].items()})
    assert (cfg.model.hidden, cfg.model.n_kv_heads, cfg.model.rope_theta) == (32, 2, 50000.0)
    want = hf_logits(model)
    got = np.asarray(forward(cfg.model, jax.tree.map(jnp.asarray, params), jnp.asarray(TOKENS)))
    assert rel(got, want) <= 1e-5
    tm = TorchLlama(cfg.model)
    tm.load_state_dict(jax_to_torch(params))
    with torch.no_grad():
        got_t = tm(torch.from_numpy(TOKENS).long()).float().numpy()
    assert rel(got_t, want) <= 1e-5


def test_sharded_import_equals_single_file(saved, tmp_path):
    d, model = saved
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / hf.INDEX).is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    for src, out in ((d, tmp_path / "a"), (sharded, tmp_path / "b")):
        assert _cli(["import", "--from", "hf", str(src), str(out)]) == 0
    a, _ = restore_numpy(tmp_path / "a")
    b, _ = restore_numpy(tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_reloads_in_transformers_bit_identically(saved, tmp_path):
    d, model = saved
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    assert _cli(["import", "--from", "hf", str(d), str(ckpt)]) == 0
    assert _cli(["export", "--to", "hf", str(ckpt), str(out)]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    want, got = model.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    np.testing.assert_array_equal(hf_logits(back), hf_logits(model))
    # bf16 export: the stored dtype, sharded names and the index as save_pretrained writes them
    out16 = tmp_path / "bf16"
    assert _cli(["export", "--to", "hf", "--dtype", "bfloat16", str(ckpt), str(out16)]) == 0
    back16 = transformers.LlamaForCausalLM.from_pretrained(out16, dtype=torch.bfloat16)
    assert back16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(back16.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_padded_vocab_preset_pads_with_zeros_and_export_drops_them(saved, tmp_path):
    d, model = saved
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    over = [f"--model.{f}={v}" for f, v in hf.model_fields(json.loads((d / "config.json").read_text())).items()]
    assert _cli(["import", "--from", "hf", "--preset", "tiny", str(d), str(ckpt), *over,
                 "--model.vocab_pad_to=64"]) == 0
    params, _ = restore_numpy(ckpt)
    assert params["embed"].shape == (128, 32) and params["head"].shape == (32, 128)
    assert not params["embed"][96:].any() and not params["head"][:, 96:].any()
    assert _cli(["export", "--to", "hf", str(ckpt), str(out)]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_preset_mismatch_names_the_field_and_the_fix(saved, tmp_path, capsys):
    d, _ = saved
    assert _cli(["import", "--from", "hf", "--preset", "tiny", str(d), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not match the model config 'tiny'" in err
    assert "hidden: " in err and "--model.hidden=32" in err and "rope_theta" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("over, words", [
    (dict(attention_bias=True), "biases"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope scaling 'linear'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_refuses_what_does_not_map(tmp_path, capsys, over, words):
    d = tmp_path / "m"
    hf_model(**over).save_pretrained(d)
    assert _cli(["import", "--from", "hf", str(d), str(tmp_path / "o")]) == 2
    assert words in capsys.readouterr().err


def test_bias_tensors_refused_even_when_config_is_silent(saved, tmp_path):
    _, model = saved
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    cfg = load_config("tiny", {f"model.{k}": v for k, v in hf.model_fields(model.config.to_dict()).items()})
    with pytest.raises(hf.HFError, match="holds biases"):
        hf.to_flat(tensors, cfg.model)


def test_missing_truncated_and_existing_output_are_one_line_errors(saved, tmp_path, capsys):
    d, _ = saved
    assert _cli(["import", "--from", "hf", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((d / "config.json").read_text())
    data = (d / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert _cli(["import", "--from", "hf", str(broken), str(tmp_path / "o")]) == 2
    assert "unreadable safetensors file" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    assert _cli(["import", "--from", "hf", str(d), str(ckpt)]) == 0
    (tmp_path / "taken").mkdir()
    assert _cli(["export", "--to", "hf", str(ckpt), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_70b_gqa_names_and_shapes_match_transformers():
    """The 70B preset's HF layout (GQA 64/8 heads, unpadded vocab), checked on a meta-device model."""
    cfg = load_config("llama2-70b")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf.config_json(cfg.model).items()
                                         if k not in ("architectures", "torch_dtype", "dtype")})
    with torch.device("meta"):
        ref = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(hf_cfg).state_dict().items()}
    assert hf.shapes(cfg.model) == ref
    assert ref["model.layers.79.self_attn.k_proj.weight"] == (1024, 8192)
    assert sum(int(np.prod(s)) for s in ref.values()) == 68_976_648_192
    # the JAX side's shapes are the same arrays transposed/stacked, vocabulary padded 32000 -> 32000 (pad 128)
    js = jax.eval_shape(lambda: init_params(cfg.model, 0))
    assert js["layers"]["wk"].shape == (80, 8192, 1024) and js["head"].shape == (8192, cfg.model.padded_vocab)


def test_wrong_shapes_are_named(saved):
    _, model = saved
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = load_config("tiny", {f"model.{k}": v for k, v in hf.model_fields(model.config.to_dict()).items()})
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((50, 32), np.float32)
    with pytest.raises(hf.HFError, match=r"up_proj.weight: \(50, 32\) vs \(48, 32\)"):
        hf.to_flat(tensors, cfg.model)


def _model_flags(d: Path) -> list[str]:
    return [f"--model.{f}={v}" for f, v in hf.model_fields(json.loads((d / "config.json").read_text())).items()]


def test_init_from_hf_dir_and_from_its_import_train_alike_and_start_at_the_hf_loss(saved, tmp_path):
    from aurora_data import build_source, global_batch
    from jax_impl import train as jax_train

    d, model = saved
    ckpt = tmp_path / "ckpt"
    assert _cli(["import", "--from", "hf", str(d), str(ckpt)]) == 0
    args = ["--preset", "tiny", *_model_flags(d), "--steps", "3", "--mesh", "fsdp=2", "--wandb", "disabled",
            "--quiet", "--out-dir", str(tmp_path)]
    a = jax_train.main([*args, "--name", "hf", "--init-from", str(d)])
    b = jax_train.main([*args, "--name", "ck", "--init-from", str(ckpt)])
    assert a["losses"] == b["losses"]
    # step 1's loss is the loss of the HF weights on the first batch (before any update)
    cfg = load_config("tiny", {f"model.{k}": v for k, v in hf.model_fields(model.config.to_dict()).items()})
    tokens = torch.from_numpy(global_batch(build_source(cfg), 0, cfg.parallel.mbs * 2, 1, 1)[0]).long()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert a["losses"][0] == pytest.approx(float(want), rel=1e-5)
    meta = json.loads((a["run_dir"] / "meta.json").read_text())
    assert meta["init_from"] == str(d)


def test_init_from_a_mismatched_model_or_with_resume_is_refused(saved, tmp_path, capsys):
    from jax_impl import train as jax_train

    d, _ = saved
    args = ["--preset", "tiny", "--steps", "1", "--wandb", "disabled", "--quiet", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        jax_train.main([*args, "--name", "x", "--init-from", str(d)])
    assert e.value.code == 2 and "--model.hidden=32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        jax_train.main([*args, "--name", "y", "--init-from", str(d), "--resume", str(tmp_path / "x")])
    assert e.value.code == 2 and "exclude each other" in capsys.readouterr().err


@pytest.mark.slow
def test_torch_ref_init_from_hf_and_from_a_jax_checkpoint_match_jax(saved, tmp_path):
    from jax_impl import train as jax_train
    from torch_ref import train as torch_train

    d, _ = saved
    ckpt = tmp_path / "ckpt"
    assert _cli(["import", "--from", "hf", str(d), str(ckpt)]) == 0
    args = ["--preset", "tiny", *_model_flags(d), "--steps", "3", "--mesh", "data=2", "--zero", "1",
            "--wandb", "disabled", "--quiet", "--out-dir", str(tmp_path)]
    j = jax_train.main([*args, "--name", "jax", "--init-from", str(d)])
    t_hf = torch_train.main([*args, "--name", "torch-hf", "--init-from", str(d)])
    t_ck = torch_train.main([*args, "--name", "torch-ck", "--init-from", str(ckpt)])
    assert t_hf["losses"] == t_ck["losses"]
    assert max(abs(a - b) / b for a, b in zip(t_hf["losses"], j["losses"], strict=True)) <= 1e-5
