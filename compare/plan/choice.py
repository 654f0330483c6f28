"""``--mesh auto``: the fastest layout that fits a run config at its global batch (``choose``), judged by the
framework that runs it, with the runner-up and why (``Decision``); ``auto_layout`` is the trainers' entry point."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compare.cluster import Cluster, load_cluster
from compare.plan.assumptions import GB, Assumptions
from compare.plan.fit import calibrate
from compare.plan.jax_probe import jax_memory
from compare.plan.layout import Layout, register_config
from compare.plan.rank import Planned, check_gbs, plan
from configs import Config, ConfigError


class NothingFits(ConfigError):
    """No layout fits at this global batch and sequence (the message names what would)."""


def host_cluster(devices: int) -> Cluster:
    """This host as one node of ``devices`` CPU devices sharing its memory and cores.

    Assumed figures, not fitted (there is no reference run on a CPU): ~50 GFLOPS and ~10 GB/s of memory
    bandwidth per core; the devices split the host's RAM (80 % of it usable) and its cores."""
    if devices < 1:
        raise ConfigError(f"{devices} devices: need at least one")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = os.cpu_count() or 1
    share = cores / devices
    return Cluster(name=f"host-cpu-{devices}dev", tiles_per_node=devices, tiles_per_gpu=1, mem_gb=ram / GB / devices,
                   usable_frac=0.8, peak_tflops=0.05 * share, hbm_bw_gbs=10.0 * share, gpu_bw_gbs=10.0,
                   intra_bw_gbs=10.0 * share, inter_bw_gbs=10.0 * cores, intra_lat_us=5.0, inter_lat_us=5.0)


@dataclass
class Decision:
    """The layout ``choose`` picked, what it weighed and why; ``to_dict`` is what a run records in meta.json."""

    pick: Layout
    runner_up: Layout | None
    framework: str
    config: Config  # the input config with the pick applied
    inputs: dict[str, Any]
    candidates: list[dict[str, Any]]
    why: str
    pick_info: dict[str, Any]
    runner_up_info: dict[str, Any] | None
    cluster_source: str
    memory_source: str

    def parallel(self) -> dict[str, Any]:
        """The parallel settings the pick sets (what a resumed run reapplies)."""
        p = self.config.parallel
        return {k: getattr(p, k) for k in ("mesh", "zero", "hpz", "mics", "mbs", "gas", "gbs", "remat",
                                           "remat_policy", "pipeline_schedule")}

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "cluster_source": self.cluster_source, "memory_source": self.memory_source,
                "pick": self.pick_info, "runner_up": self.runner_up_info, "why": self.why,
                "parallel": self.parallel(), "candidates": self.candidates}

    def lines(self) -> list[str]:
        """What a trainer prints: the pick and the runner-up, each with samples/s and memory margin."""
        out = [f"--mesh auto: {self.inputs['model']} at GBS {self.inputs['gbs']}, seq {self.inputs['seq']}, on "
               f"{self.inputs['devices']} devices; planned with {self.cluster_source}; memory verdict: "
               f"{self.memory_source}"]
        for tag, info in (("pick", self.pick_info), ("runner-up", self.runner_up_info)):
            if info:
                out.append(f"  {tag:<9} {info['layout']} ({info['variant']}): {info['sps']:.4g} samples/s predicted, "
                           f"memory margin {info['margin_gb']:+.2f} GB/device ({info['memory']})")
        out.append(f"  why: {self.why}")
        return out


def _info(p: Planned, jax_verdict: dict[str, Any] | None = None) -> dict[str, Any]:
    assert p.step is not None and (p.memory is not None or jax_verdict is not None)
    d: dict[str, Any] = {"layout": p.layout.label, "variant": p.layout.variant, "family": p.layout.family,
                         "gbs": p.layout.gbs, "sps": round(p.step.sps, 6)}
    if p.memory is not None:
        d |= {"ds_mem_gb": round(p.memory.total / GB, 3), "ds_margin_gb": round(p.memory.margin / GB, 3),
              "ds_err_gb": round(p.memory.err / GB, 3),
              "ds_verdict": "uncertain" if p.memory.uncertain else "fits" if p.memory.fits else "OOM"}
    else:  # no DeepSpeed figure for a layout DeepSpeed does not run
        d |= {"ds_mem_gb": None, "ds_margin_gb": None, "ds_err_gb": None,
              "ds_verdict": f"not run by DeepSpeed: {p.ds_refusal}"}
    d["runs_on"] = list(p.runs_on)
    if jax_verdict is not None:
        d |= jax_verdict
        d["margin_gb"], d["memory"] = jax_verdict["jax_margin_gb"], "JAX " + jax_verdict["jax_verdict"]
    else:
        d["margin_gb"], d["memory"] = d["ds_margin_gb"], f"DeepSpeed model {d['ds_verdict']}, ±{d['ds_err_gb']} GB"
    return d


def _torch_refusal(cfg: Config, lay: Layout) -> str:
    """'' if torch_ref runs ``lay`` (its own layout check), else why not."""
    from torch_ref.layouts import plan_layout

    try:
        plan_layout(lay.apply(cfg, "torch"), lay.ngpu)
    except ConfigError as e:
        return str(e).split(";")[0]
    return ""


def _ranked(planned: Sequence[Planned]) -> list[Planned]:
    """Clear fits by samples/s, then the uncertain ones: a verdict within the model's error never goes first."""
    seen: set[tuple[str, str]] = set()
    out = []
    for p in sorted((p for p in planned if p.fits or p.uncertain),
                    key=lambda p: (p.uncertain, -p.step.sps, p.layout.label, p.layout.variant)):  # type: ignore
        if (p.layout.label, p.layout.variant) not in seen:  # a mesh can belong to two families
            seen.add((p.layout.label, p.layout.variant))
            out.append(p)
    return out


def _nothing_fits(cfg: Config, model: str, nodes: int | None, cluster: Cluster, a: Assumptions, framework: str,
                  gbs: int, seq: int, why: str) -> NothingFits:
    """The error for a job nothing fits: the smallest node count that fits (a cluster job), else the largest GBS.

    Both hints are the DeepSpeed model's, so they count only layouts DeepSpeed runs (a JAX-only layout has no
    DeepSpeed figure: ``Planned.fits`` is False until JAX compiles it)."""
    def any_fit(n: int, g: int | None) -> bool:
        try:
            ps = plan(model, n, cluster, a, seq, gbs=g)
        except ConfigError:
            return False
        return any(p.fits and (g is not None or p.layout.gbs <= gbs) and (
            framework != "torch" or not _torch_refusal(cfg, p.layout)) for p in ps)

    head = f"--mesh auto: no layout fits {cfg.model.name} at GBS {gbs}, seq {seq} on "
    where = f"{nodes} x {cluster.name} nodes" if nodes else f"{cluster.tiles_per_node} devices ({cluster.name})"
    if nodes:
        for n in range(nodes + 1, 8 * nodes + 33):
            if any_fit(n, gbs):
                return NothingFits(f"{head}{where} ({why}); the smallest node count that fits at this GBS and seq "
                                   f"is {n} (DeepSpeed memory model): --nodes {n}")
    fits = [p.layout.gbs for p in plan(model, nodes or 1, cluster, a, seq) if p.fits and p.layout.gbs < gbs]
    hint = (f"the largest GBS that fits on these {where} is {max(fits)} (--parallel.gbs={max(fits)}, DeepSpeed "
            "memory model)" if fits else "no global batch fits there: use more devices or a smaller model")
    return NothingFits(f"{head}{where} ({why}); {hint}")


def _where(a: Assumptions, nodes: int | None, cluster: Cluster | None, devices: int | None
           ) -> tuple[Cluster, int | None, Assumptions, str]:
    """(cluster, nodes, assumptions, description of the planning source) for a job on ``nodes`` nodes, or on the
    ``devices`` this process sees (of ``cluster``, else of this host)."""
    if nodes is not None:
        if nodes < 1:
            raise ConfigError(f"--nodes {nodes} must be >= 1")
        cluster = cluster or load_cluster("aurora")
        fit = calibrate(cluster=cluster, a=a, loo=False)
        a = dataclasses.replace(a, **fit.params)
        return cluster, nodes, a, (f"cluster description '{cluster.name}' ({cluster.describe()}), step-time model "
                                   "fitted to the study")
    if not devices:
        raise ConfigError("--mesh auto without --nodes needs the number of devices this process sees")
    if cluster is not None:
        if devices % cluster.tiles_per_node:  # fewer or other than whole nodes: the visible devices as one node
            cluster = dataclasses.replace(cluster, name=f"{cluster.name}-{devices}dev", tiles_per_node=devices,
                                          tiles_per_gpu=math.gcd(devices, cluster.tiles_per_gpu))
        return cluster, devices // cluster.tiles_per_node, a, (
            f"cluster description '{cluster.name}' for the {devices} visible devices ({cluster.describe()}), "
            "step-time model not fitted")
    cluster = host_cluster(devices)
    a.runtime_gb = 1.0 / cluster.tiles_per_node  # one process's runtime shared by its fake devices
    return cluster, None, a, (f"a description of this host ({cluster.describe()}; assumed figures, not measured), "
                              "not a cluster model")


def _pick_torch(ranked: list[Planned], gbs: int) -> tuple[list[dict[str, Any]], str, list[tuple[Planned, dict]]]:
    """(candidates weighed, why, [(pick, info), (runner-up, info)]) by the DeepSpeed model's verdicts."""
    infos = [_info(p) for p in ranked]
    run_i = next((i for i in range(1, len(ranked)) if ranked[i].layout.label != ranked[0].layout.label), None)
    n_clear = sum(not p.uncertain for p in ranked)
    faster_unsure = [p for p in ranked if p.uncertain and p.step.sps > ranked[0].step.sps]  # type: ignore
    why = (f"fastest predicted of the {n_clear} layouts at GBS {gbs} that the DeepSpeed model says clearly fit"
           + (" (none clearly fits: the pick is within the model's error)" if ranked[0].uncertain else "")
           + (f"; {len(faster_unsure)} faster ones are within the model's error and not picked, fastest "
              f"{faster_unsure[0].layout.label} ({faster_unsure[0].layout.variant})" if faster_unsure else ""))
    return infos[:20], why, [(ranked[i], infos[i]) for i in (0, run_i) if i is not None]


def _jax_order(planned: Sequence[Planned]) -> list[Planned]:
    """What the JAX probe may compile, by predicted speed: the layouts DeepSpeed runs that its model does not call
    OOM, and those DeepSpeed does not run (no DeepSpeed figure to prune them)."""
    out = _ranked(planned)
    seen = {(p.layout.label, p.layout.variant) for p in out}
    for p in planned:
        if p.unprobed and (p.layout.label, p.layout.variant) not in seen:  # a mesh can belong to two families
            seen.add((p.layout.label, p.layout.variant))
            out.append(p)
    return sorted(out, key=lambda p: (-p.step.sps, p.layout.label, p.layout.variant))  # type: ignore


def _probe(order: list[Planned], model: str, seq: int, cache: Path | None, top: int, rounds: int, usable: float,
           err: float) -> dict[int, dict[str, Any]]:
    """JAX's verdict of ``order``'s layouts, ``top`` compiled at a time (first the best variant of each mesh not
    tried, then the rest by speed), until one fits or ``rounds`` batches: {index in order: verdict}."""
    from concurrent.futures import ThreadPoolExecutor

    done: dict[int, dict[str, Any]] = {}
    for _ in range(rounds):
        todo: list[int] = []
        labels = {order[i].layout.label for i in done}
        for i, p in enumerate(order):
            if i not in done and p.layout.label not in labels and len(todo) < top:
                todo.append(i)
                labels.add(p.layout.label)
        for i in range(len(order)):
            if len(todo) < top and i not in done and i not in todo:
                todo.append(i)
        if not todo:
            break
        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as ex:
            results = list(ex.map(lambda i: jax_memory(model, order[i].layout, seq, cache=cache), todo))
        for i, res in zip(todo, results, strict=True):
            done[i] = order[i].judge_jax(res, usable, err)
        if any(v["jax_verdict"] == "fits" for v in done.values()):
            break
    return done


def _pick_jax(order: list[Planned], done: dict[int, dict[str, Any]]
              ) -> tuple[list[dict[str, Any]], str, list[tuple[Planned, dict]]]:
    """(candidates weighed, why, [(pick, info), (runner-up, info)]) by JAX's compiled peaks; [] if none fits."""
    considered = [_info(order[i], done[i]) for i in sorted(done)]
    clear = sorted(i for i, v in done.items() if v["jax_verdict"] == "fits")
    unsure = sorted(i for i, v in done.items() if v["jax_verdict"] == "uncertain")
    best = clear + unsure  # order is by speed: a clear fit always before one within the error
    if not best:
        why = "; ".join(f"{order[i].layout.label}: JAX {v['jax_verdict']}" + (
            f" by {-v['jax_margin_gb']:.1f} GB" if v["jax_verdict"] == "OOM" else "") for i, v in done.items())
        return considered, why or "the DeepSpeed model rejects every layout DeepSpeed runs", []
    n_jax = sum(p.jax_only for p in order)
    of = (f"{len(order)} the DeepSpeed model did not reject" if not n_jax else
          f"{len(order)}: {len(order) - n_jax} the DeepSpeed model did not reject, {n_jax} DeepSpeed does not run")
    faster = [f"{order[i].layout.label} (JAX {done[i]['jax_verdict']})" for i in sorted(done) if i < best[0]]
    why = (f"fastest predicted of the {len(done)} compiled (of {of}) whose JAX compiled peak fits"
           + (" (none clearly fits: the pick is within the error)" if not clear else "")
           + (f"; faster but not a clear fit: {', '.join(faster)}" if faster else ""))
    return considered, why, [(order[i], _info(order[i], done[i])) for i in best[:2]]


def choose(cfg: Config, *, nodes: int | None = None, cluster: Cluster | None = None, framework: str = "jax",
           devices: int | None = None, top: int = 3, rounds: int = 3, assumptions: Assumptions | None = None,
           cache: Path | None = None) -> Decision:
    """The fastest layout that fits ``cfg`` at its global batch (``parallel.gbs``) and sequence.

    ``nodes`` + ``cluster``: a job on that many nodes (the step-time model fitted to the study's runs).
    Otherwise ``devices`` of this host (``host_cluster``, assumed figures) or of ``cluster``. The memory verdict
    comes from the framework that will run: torch -> the DeepSpeed model, among the layouts torch_ref runs;
    jax -> the DeepSpeed model prunes what it calls OOM among the layouts DeepSpeed runs (those it does not run
    are not pruned), then the ``top`` fastest are AOT-compiled (parallel processes, cached by config hash) and
    XLA's peak decides, up to ``rounds`` batches. A verdict within its model's error is never picked over a clear
    fit. Deterministic for the same inputs. Raises ConfigError (NothingFits when no layout fits)."""
    if framework not in ("jax", "torch"):
        raise ConfigError(f"framework {framework!r}: use 'jax' or 'torch'")
    gbs, seq = cfg.parallel.gbs, cfg.data.seq_len
    if gbs < 1:
        raise ConfigError(f"--mesh auto needs the global batch: parallel.gbs={gbs}; set --parallel.gbs=G (samples "
                          "per step, e.g. the study's 96 or 768), the planner then splits it into mbs x gas x dp")
    cluster, nodes, a, source = _where(dataclasses.replace(assumptions or Assumptions()), nodes, cluster, devices)
    n_nodes = nodes or 1
    # planned without the run's name, steps, seed, ...: they change no memory, and the compile cache is keyed by
    # the config's hash
    from configs.schema import TrainConfig

    model = register_config(dataclasses.replace(cfg, train=TrainConfig(dtype=cfg.train.dtype,
                                                                       platform=cfg.train.platform)))
    check_gbs(model, n_nodes, cluster, gbs, flag="parallel.gbs")
    planned = [p for p in plan(model, n_nodes, cluster, a, seq, gbs=gbs) if not p.structural]
    inputs = {"model": cfg.model.name, "config_hash": cfg.hash(), "framework": framework, "gbs": gbs, "seq": seq,
              "nodes": nodes, "devices": n_nodes * cluster.tiles_per_node, "cluster": dataclasses.asdict(cluster),
              "assumptions": dataclasses.asdict(a)}
    if framework == "torch":
        refused: dict[str, str] = {}
        for p in planned:
            why = refused.setdefault(p.layout.label, _torch_refusal(cfg, p.layout))
            if why:
                p.reason, p.memory, p.step = f"not run by torch_ref: {why}", None, None
        memory_source = "DeepSpeed memory model (the framework that runs)"
        ranked = _ranked(planned)
        if not ranked:
            raise _nothing_fits(cfg, model, nodes, cluster, a, framework, gbs, seq, "DeepSpeed memory model")
        considered, why, chosen = _pick_torch(ranked, gbs)
    else:
        memory_source = (f"JAX AOT-compiled peak (XLA:CPU memory_analysis, ±{a.mem_err_jax:.0%}) of the top "
                         "candidates; the DeepSpeed model only pruned the layouts DeepSpeed runs")
        order = _jax_order(planned)
        done = _probe(order, model, seq, cache, top, rounds, cluster.usable_bytes, a.mem_err_jax)
        considered, why, chosen = _pick_jax(order, done)
        if not chosen:
            raise _nothing_fits(cfg, model, nodes, cluster, a, framework, gbs, seq, why)
    (pick, pick_info), (runner, runner_info) = chosen[0], chosen[1] if len(chosen) > 1 else (None, None)
    return Decision(pick.layout, runner.layout if runner else None, framework, pick.layout.apply(cfg, framework),
                    inputs, considered, why, pick_info, runner_info, source, memory_source)


def auto_layout(cfg: Config, *, framework: str, nodes: int | None = None, cluster: str | None = None,
                devices: int | None = None, recorded: dict[str, Any] | None = None, cache: Path | None = None
                ) -> tuple[Config, dict[str, Any], list[str]]:
    """``--mesh auto`` for a trainer: (cfg with the chosen layout, the record for meta.json, lines to print).

    ``recorded`` (a resumed run's ``runtime.rundir.recorded_layout``): its layout is reused, nothing re-planned."""
    if recorded is not None:
        was = recorded["parallel"].get("gbs")
        if cfg.parallel.gbs and was and cfg.parallel.gbs != was:
            raise ConfigError(f"parallel.gbs={cfg.parallel.gbs}, but the run being resumed was planned at GBS {was}; "
                              f"a resume keeps its layout and batch: drop --parallel.gbs or give {was}")
        par = dataclasses.replace(cfg.parallel, **{k: v for k, v in recorded["parallel"].items()
                                                   if k in {f.name for f in dataclasses.fields(cfg.parallel)}})
        rec = dict(recorded.get("decision") or {}, reused_on_resume=True)
        return dataclasses.replace(cfg, parallel=par), rec, [
            f"--mesh auto: resuming with the run's recorded layout {par.mesh} ZeRO-{par.zero}"
            + (" hpZ" if par.hpz else "") + (" MiCS" if par.mics else "")
            + f", mbs {par.mbs} gas {par.gas}, GBS {par.gbs} (not re-planned)"]
    cl = load_cluster(cluster or "aurora") if nodes is not None or cluster is not None else None
    d = choose(cfg, nodes=nodes, cluster=cl, framework=framework, devices=devices, cache=cache)
    return d.config, d.to_dict(), d.lines()
