"""Run options as config sections ([checkpoint], [nonfinite], [watchdog]), jax_impl's [jax] knobs, old key
spellings, old run directories, torch_ref's declared support and one validation per start."""

from __future__ import annotations

import dataclasses
import json

import pytest

from compare import report
from configs import KEY_ALIASES, Config, ConfigError, config_from_dict, load_config, load_preset, schema
from configs.cli import SHORTHANDS, resolve_config, trainer_parser
from torch_ref import train as torch_train

TINY = ["--preset", "tiny", "--wandb", "disabled", "--quiet"]

# (key, TOML/override value, the shorthand's command-line words, the resolved value)
RUN_OPTIONS = [
    ("checkpoint.every", 3, ["--ckpt-every", "3"], 3),
    ("checkpoint.every_s", 60.0, ["--ckpt-every-s", "60"], 60.0),
    ("checkpoint.keep", 5, ["--ckpt-keep", "5"], 5),
    ("checkpoint.dir", "/tmp/ck", ["--ckpt-dir", "/tmp/ck"], "/tmp/ck"),
    ("nonfinite.action", "skip", ["--on-nonfinite", "skip"], "skip"),
    ("nonfinite.max_skips", 4, ["--max-skips", "4"], 4),
    ("watchdog.factor", 5.0, ["--watchdog-factor", "5"], 5.0),
    ("watchdog.min_s", 3.0, ["--watchdog-min-s", "3"], 3.0),
    ("watchdog.first_s", 0.0, ["--watchdog-first-s", "0"], 0.0),
]


def get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def cli(*argv: str) -> Config:
    return resolve_config(trainer_parser("t", None), ["--preset", "tiny", *argv])[0]


@pytest.mark.parametrize("key, value, flag, want", RUN_OPTIONS, ids=[r[0] for r in RUN_OPTIONS])
def test_toml_override_and_shorthand_set_the_same_key(tmp_path, key, value, flag, want):
    section, name = key.split(".")
    toml = tmp_path / "p.toml"
    toml.write_text(f"[{section}]\n{name} = {json.dumps(value)}\n")
    assert get(Config(), key) != want  # each case sets a non-default value
    assert get(load_preset(str(toml)), key) == want
    assert get(cli(f"--{key}={value}"), key) == want
    assert get(cli(*flag), key) == want


def test_every_shorthand_names_a_config_key():
    for key in SHORTHANDS.values():
        get(Config(), key)  # AttributeError if a shorthand wrote a key the schema lacks
    assert {r[0] for r in RUN_OPTIONS} <= set(SHORTHANDS.values())


@pytest.mark.parametrize("argv", [["--ckpt.every=3"], ["--ckpt.every", "3"], ["--train.ckpt_every=3"],
                                  ["--checkpoint.every", "3"]])
def test_old_checkpoint_spellings_still_parse(argv):
    assert cli(*argv).checkpoint.every == 3


@pytest.mark.parametrize("old, new, value", [(k, v, 7 if k.endswith(("chunk", "unroll", "repeats")) else None)
                                             for k, v in KEY_ALIASES.items() if k.startswith("parallel.")])
def test_old_parallel_keys_are_aliases_of_jax_keys(tmp_path, old, new, value):
    value = value if value is not None else {"jax.sequence_parallel": True, "jax.pipeline_head": "last",
                                             "jax.attn_impl": "cudnn", "jax.matmul_out": "compute"}[new]
    section, name = old.split(".")
    toml = tmp_path / "old.toml"
    toml.write_text(f"[{section}]\n{name} = {json.dumps(value)}\n")
    assert get(load_preset(str(toml)), new) == value  # an old preset
    assert get(load_config("tiny", {old: value}, validate=False), new) == value  # an old --parallel.x= override
    old_dict = Config().to_dict()
    old_dict["parallel"][name] = value
    del old_dict["jax"]
    assert get(config_from_dict(old_dict), new) == value  # an old run directory's config.json
    assert not hasattr(Config().parallel, name)


def test_aliases_point_at_existing_keys_only():
    keys = {f"{s}.{k}" for s, v in Config().to_dict().items() if isinstance(v, dict) for k in v}
    assert set(KEY_ALIASES.values()) <= keys and not set(KEY_ALIASES) & keys


def old_config_json(cfg: Config) -> dict:
    """``cfg`` as a run directory written before the sections existed: no [jax]/run-option sections, the JAX
    knobs under parallel."""
    d = cfg.to_dict()
    for s in schema.RUN_OPTION_SECTIONS:
        del d[s]
    d["parallel"].update(d.pop("jax"))
    return d


def test_run_options_change_no_hash_and_no_report_decision(tmp_path):
    cfg = load_config("tiny")
    other = load_config("tiny", {"checkpoint.every": 5, "checkpoint.keep": 9, "watchdog.factor": 3,
                                 "nonfinite.action": "skip"})
    assert cfg.hash() == other.hash()
    assert cfg.hash() != load_config("tiny", {"jax.attn_chunk": 8}).hash()
    assert not report.config_diff(old_config_json(cfg), other.to_dict())
    assert report.config_diff(old_config_json(cfg), load_config("tiny", {"jax.attn_chunk": 8}).to_dict()) == [
        "jax.attn_chunk: 1024 vs 8"]


def test_old_config_json_is_still_reusable_by_the_report(tmp_path):
    from runtime.rundir import write_meta

    cfg = report.run_config("tiny", report.LAYOUTS["zero1"], "fp32", 2, tmp_path, "jax")
    run_dir = tmp_path / cfg.train.name
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"hash": "old", "config": old_config_json(cfg)}))
    write_meta(run_dir, {"framework": "jax", "devices": 2, "gbs": 4})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 5.0}) + "\n" for i in (1, 2)))
    assert report.reusable(run_dir, cfg)
    assert not report.reusable(run_dir, dataclasses.replace(cfg, jax=dataclasses.replace(cfg.jax, attn_chunk=8)))


def test_jax_resumes_an_old_run_directory_with_other_run_options(tmp_path):
    from jax_impl.train import main

    common = [*TINY, "--out-dir", str(tmp_path), "--name", "old"]
    main([*common, "--steps", "2", "--ckpt-every", "2"])
    cj = tmp_path / "old" / "config.json"
    doc = json.loads(cj.read_text())
    doc["config"] = old_config_json(config_from_dict(doc["config"]))
    cj.write_text(json.dumps(doc))
    res = main([*common, "--steps", "3", "--resume", str(tmp_path / "old"), "--ckpt-every", "1", "--ckpt-keep",
                "3", "--watchdog-factor", "20", "--on-nonfinite", "skip"])
    assert res["start_step"] == 2 and len(res["losses"]) == 1
    now = json.loads(cj.read_text())["config"]
    assert now["checkpoint"]["keep"] == 3 and now["watchdog"]["factor"] == 20.0 and "attn_chunk" in now["jax"]


# ----------------------------------------------------------------------------- torch_ref's declared support
def test_torch_declares_every_key_of_the_sections_it_reads_in_part():
    for section in ("parallel", "checkpoint", "nonfinite", "watchdog"):
        for f in dataclasses.fields(getattr(Config(), section)):
            key = f"{section}.{f.name}"
            assert (f.name in torch_train.SUPPORTED.get(section, ())) or key in torch_train.UNSUPPORTED, key


@pytest.mark.parametrize("argv, said", [
    (["--ckpt-keep", "3"], "checkpoint.keep=3 (--ckpt-keep) is jax_impl.train only; torch_ref keeps every "
                           "DeepSpeed checkpoint tag: drop it"),
    (["--checkpoint.dir=/tmp/x"], "checkpoint.dir='/tmp/x' (--ckpt-dir) is jax_impl.train only"),
    (["--on-nonfinite", "skip"], "nonfinite.action='skip' (--on-nonfinite) is jax_impl.train only; torch_ref "
                                 "stops at a non-finite loss"),
    (["--max-skips", "3"], "nonfinite.max_skips=3 (--max-skips) is jax_impl.train only"),
    (["--watchdog-factor", "5"], "watchdog.factor=5.0 (--watchdog-factor) is jax_impl.train only; torch_ref has no "
                                 "step watchdog: drop it"),
    (["--watchdog.first_s=0"], "watchdog.first_s=0.0 (--watchdog-first-s) is jax_impl.train only"),
    (["--parallel.remat_policy=save_dots"], "parallel.remat_policy='save_dots' is jax_impl.train only"),
    (["--coordinator", "h:1"], "--coordinator: jax_impl.train only"),
])
def test_torch_refuses_what_it_does_not_honour(tmp_path, capsys, argv, said):
    with pytest.raises(SystemExit) as e:
        torch_train.main([*TINY, "--mesh", "data=1", "--out-dir", str(tmp_path), "--dry-run", *argv])
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_torch_runs_a_config_that_tunes_jax_knobs(capsys):
    out = torch_train.main([*TINY, "--mesh", "data=1", "--dry-run", "--jax.attn_chunk=8", "--parallel.scan_unroll=2",
                            "--jax.sequence_parallel=true", "--ckpt-every", "2", "--ckpt-keep", "2"])
    assert out["layout"].world_size == 1 and "activation checkpointing" not in capsys.readouterr().err
    torch_train.main([*TINY, "--mesh", "data=1", "--dry-run", "--parallel.remat=true"])  # accepted, and said
    assert "parallel.remat=true: torch_ref has no activation checkpointing" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one validation per start
def count_validations(monkeypatch) -> dict[str, int]:
    """Calls of every section check (a full validate_config runs each once)."""
    calls = dict.fromkeys(schema.SECTION_CHECKS, 0)
    for section, check in list(schema.SECTION_CHECKS.items()):
        def counted(cfg, mesh=None, _check=check, _section=section):
            calls[_section] += 1
            return _check(cfg, mesh)
        monkeypatch.setitem(schema.SECTION_CHECKS, section, counted)
    return calls


def test_torch_dry_run_validates_once(monkeypatch):
    calls = count_validations(monkeypatch)
    torch_train.main([*TINY, "--mesh", "data=2", "--zero", "1", "--dry-run"])
    assert calls == dict.fromkeys(schema.SECTION_CHECKS, 1)


def test_jax_dry_run_validates_once(monkeypatch):
    from jax_impl.train import main

    calls = count_validations(monkeypatch)
    main([*TINY, "--mesh", "fsdp=2", "--dry-run"])
    assert calls == dict.fromkeys(schema.SECTION_CHECKS, 1)


def test_jax_mesh_with_a_free_axis_checks_its_layout_once_the_devices_are_known(monkeypatch):
    from jax_impl.train import main

    calls = count_validations(monkeypatch)
    main([*TINY, "--mesh", "data=2,fsdp=-1", "--dry-run"])  # tests run on 8 fake CPU devices
    assert calls == dict.fromkeys(schema.SECTION_CHECKS, 1)


def test_section_errors_still_name_flag_and_key():
    with pytest.raises(ConfigError, match=r"--ckpt-keep 0: must be >= 1 .*checkpoint.keep"):
        load_config("tiny", {"checkpoint.keep": 0})
    with pytest.raises(ConfigError, match=r"--watchdog-min-s -1: must be >= 0 .*watchdog.min_s"):
        load_config("tiny", {"watchdog.min_s": -1})
    with pytest.raises(ConfigError, match=r"nonfinite.action='retry' is not one of stop, skip"):
        load_config("tiny", {"nonfinite.action": "retry"})
