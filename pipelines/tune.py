"""Sweeps on Ray Tune: each trial is a run (data + train + embed + evaluate) of the same output root.

The sweep is one writer of the output root: its driver holds the root's lock while the trials run, and the
trials run their stages without taking it (``run_pipeline(cfg, lock=False)``). Trial ``i`` of sweep ``S`` is
run ``S-tNN``; the sweep's own run ``S`` gets a ``metrics`` part ``tune`` (stage ``tune``, split = trial run
id) and a ``sweep`` entry in its manifest (grid, overrides and status of every trial).
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import yaml

from dml_ray.config import RunConfig, parse_config, uri_scheme
from dml_ray.io.fs import join, pyarrow_fs
from dml_ray.io.run import Run, open_run
from dml_ray.io.schemas import METRICS_SCHEMA

log = logging.getLogger(__name__)

TRIAL_STAGES = ["data", "train", "embed", "evaluate"]
PART = "tune"
# what a trial's own actor reserves: no CPU (its run's work is scheduled outside it, ``_trial``; even 0.01 CPU
# would leave 1.99 of 2 and starve a 1-CPU Ray Data task beside a 1-CPU embedding actor), and a placement
# group bundle cannot be empty: 64 MiB of memory
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024 * 1024}


def _value(text: str) -> Any:
    """A grid value as YAML, with numbers YAML 1.1 leaves as strings (``1e-4``) read as floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """``["train.optimizer.lr=1e-4,3e-4", ...]`` -> ``{"train.optimizer.lr": [0.0001, 0.0003]}`` (values as YAML)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid {spec!r}: expected KEY=VALUE[,VALUE...]")
        grid[key.strip()] = [_value(v) for v in values.split(",")]
    if not grid:
        raise ValueError("tune: give at least one --grid KEY=VALUES")
    return grid


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping with dotted-key ``overrides`` applied."""
    data = copy.deepcopy(config)
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def _absolute(config: dict[str, Any]) -> dict[str, Any]:
    """Local relative paths made absolute: Tune runs each trial in its own working directory."""
    data = copy.deepcopy(config)
    if uri_scheme(data["output_root"]) == "file":
        data["output_root"] = os.path.abspath(data["output_root"])
    root = data.get("data", {}).get("root")
    if root and uri_scheme(root) == "file":
        data["data"]["root"] = os.path.abspath(root)
    return data


def objective_metrics(run: Run) -> dict[str, float]:
    """What a trial reports: Recall@1 and MAP@R of the evaluated primary split (test, else In-Shop's
    query_gallery), and with validation the kept model's validation value (``val_<metric>``)."""
    rows = run.read("metrics").to_pylist()
    evaluated = [r for r in rows if r["stage"] == "evaluate"]
    splits = [r["split"] for r in evaluated]
    split = next((s for s in ("test", "query_gallery") if s in splits), splits[0] if splits else None)
    out = {}
    for r in evaluated:
        if r["split"] == split and (r["metric"], r["k"]) in (("recall", 1), ("map_at_r", None)):
            out["recall_at_1" if r["metric"] == "recall" else "map_at_r"] = r["value"]
    val = {(r["metric"], r["k"]): r["value"] for r in rows if r["stage"] == "train" and r["split"] == "val"}
    selected = val.get(("selected_epoch", None))
    if selected is not None:
        for name in ("recall_at_1", "map_at_r"):
            if (name, int(selected)) in val:
                out[f"val_{name}"] = val[(name, int(selected))]
    return out


def _run_trial(config: dict[str, Any]) -> dict[str, float]:
    from pipelines.run import run_pipeline

    cfg = parse_config(config)
    run_pipeline(cfg, lock=False)
    return objective_metrics(open_run(cfg.output_root, cfg.run_id, cfg.storage))


def _trial(params: dict[str, Any], base: dict[str, Any], sweep_id: str) -> None:
    """One Tune trial: a run with the trial's overrides, reported to Tune with its metrics.

    Tune places a trial in a placement group that captures its child tasks; the run's Ray Data actors, Ray
    Train workers and evaluation tasks must be scheduled on the cluster instead, so the run executes in a
    zero-CPU task outside any placement group.
    """
    import ray
    import ray.tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    index = int(ray.tune.get_context().get_trial_id().rsplit("_", 1)[-1])
    run_id = f"{sweep_id}-t{index:02d}"
    config = {**apply_overrides(base, params), "run_id": run_id, "stages": TRIAL_STAGES}
    task = ray.remote(num_cpus=0, max_retries=0)(_run_trial).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    ray.tune.report({"run_id": run_id, **ray.get(task.remote(config))})


@dataclass
class SweepResult:
    sweep_id: str
    metric: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # run_id, overrides, metrics, error; best first


def _trial_cpus(cfg: RunConfig) -> float:
    train = max(1, cfg.train.num_workers) * cfg.train.cpus_per_worker
    embed = cfg.embed.concurrency * cfg.embed.cpus_per_actor + 1  # the actors and their read / decode tasks
    return max(train, embed)


def run_sweep(cfg: RunConfig, grid: dict[str, list[Any]], samples: Optional[int] = None,
              max_concurrent: Optional[int] = None, metric: Optional[str] = None, seed: int = 0) -> SweepResult:
    """Run a grid (every combination of ``grid``) or, with ``samples``, a random search (``samples`` trials, each
    value drawn uniformly from its list) on Ray Tune. Trials run as cluster CPUs allow (``max_concurrent``, default
    cluster CPUs / the CPUs a trial's training or embedding needs). ``metric`` ranks the trials: default
    ``val_recall_at_1`` with ``train.validation``, else ``recall_at_1`` on the test classes (logged as a warning:
    choosing hyper-parameters on the test classes overstates the result)."""
    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from pipelines.ray_env import ensure_ray
    from pipelines.run import data_root
    from dml_ray.data.synthetic import generate_synthetic

    base = _absolute(cfg.model_dump(mode="json"))
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    for combo in combos:  # every trial's config is valid before anything starts
        parse_config(apply_overrides(base, combo))
    metric = metric or ("val_recall_at_1" if cfg.train.validation.fraction > 0 else "recall_at_1")
    if not metric.startswith("val_"):
        log.warning("tune: ranking trials by %s on the test classes; set train.validation.fraction to choose "
                    "hyper-parameters on held-out training classes instead", metric)
    sweep = open_run(base["output_root"], cfg.run_id, cfg.storage, create=True)
    with sweep.lock():
        ensure_ray()
        root = data_root(parse_config(base))
        if cfg.data.kind == "synthetic" and not sweep.input_exists(join(root, "images.txt")):
            s = cfg.data.synthetic  # generated once here, not by concurrent trials
            generate_synthetic(root, s.n_classes, s.images_per_class, s.image_size, s.seed, sweep.storage_options)
        if max_concurrent is None:
            max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // _trial_cpus(cfg)))
        space = {k: tune.grid_search(v) if samples is None else tune.choice(v) for k, v in grid.items()}
        fs, path = pyarrow_fs(join(base["output_root"], "_tune"), sweep.storage_options)
        fs.create_dir(path, recursive=True)
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, base=base, sweep_id=cfg.run_id), TRIAL_RESOURCES),
            param_space=space,
            tune_config=tune.TuneConfig(num_samples=samples or 1, max_concurrent_trials=max_concurrent,
                                        search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)),
            run_config=tune.RunConfig(name=cfg.run_id, storage_path=path, storage_filesystem=fs, verbose=0),
        )
        log.info("tune: sweep %s, %s, at most %d trials at once", cfg.run_id,
                 f"{len(combos)} grid points" if samples is None else f"{samples} random samples", max_concurrent)
        results = tuner.fit()
        trials = []
        for r in results:
            metrics = {k: v for k, v in (r.metrics or {}).items() if k in ("recall_at_1", "map_at_r") or
                       k.startswith("val_")}
            trials.append({"run_id": (r.metrics or {}).get("run_id"), "overrides": r.config,
                           "metrics": metrics, "error": None if r.error is None else str(r.error).splitlines()[0]})
        trials.sort(key=lambda t: -t["metrics"].get(metric, float("-inf")))
        rows = [{"run_id": cfg.run_id, "stage": "tune", "split": t["run_id"], "metric": name, "k": None,
                 "value": float(value)} for t in trials if t["run_id"] for name, value in t["metrics"].items()]
        sweep.commit("metrics", pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), part=PART, replace=True)
        sweep.update_manifest(config=cfg.model_dump(mode="json", exclude={"storage": {"options"}}),
                              sweep={"grid": grid, "samples": samples, "metric": metric, "trials": trials})
    return SweepResult(cfg.run_id, metric, trials)


def sweep_trials(run: Run) -> Optional[list[str]]:
    """The trial run ids of a sweep run (None if ``run`` is not a sweep)."""
    sweep = run.manifest.get("sweep")
    if not sweep:
        return None
    return [t["run_id"] for t in sweep["trials"] if t.get("run_id")]
