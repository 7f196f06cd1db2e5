"""The ``dml-ray`` command: demo, synth, run, tune, explain, report, compare, query, unlock."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from importlib import resources
from typing import Any, Optional, get_args

import yaml

from dml_ray.config import ConfigError, Stage, StorageConfig, check_scheme, load_config, validate_run_id
from dml_ray.console import reset_console, setup_console
from dml_ray.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NAMES, EXIT_RETRY, exit_code, one_line
from dml_ray.io.run import open_run, storage_options_of

DEFAULT_PAIR_METHODS = "decomposition,decomposition_bias,distcam,gradcam,gradcam_nonorm,rgradcam"

log = logging.getLogger("dml_ray")


def _demo_config_path(name: str = "demo") -> str:
    return str(resources.files("jobs") / "configs" / f"{name}.yaml")


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as dotted-key overrides (values parsed as YAML)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _print_metrics(summary, mpn=None) -> None:
    """The evaluate stage's metrics, one column per split; with ``mpn`` (the mpn stage's metrics) the refined
    embeddings' values in a column beside each split's (``test+mpn``)."""
    if summary.metrics is None:
        return
    tables = [("", summary.metrics.to_pylist())] + ([("+mpn", mpn.to_pylist())] if mpn is not None else [])
    values: dict[tuple, dict[str, float]] = {}
    columns: list[str] = []
    for suffix, rows in tables:
        for row in rows:
            column = row["split"] + suffix
            if column not in columns:
                columns.append(column)
            values.setdefault((row["metric"], row["k"]), {})[column] = row["value"]
    columns.sort(key=lambda c: (c.split("+")[0] != "test", c))
    keys = [key for key in values if any(c in values[key] for c in columns if "+" not in c)]
    print(f"\n{'metric':<28}{'k':>6}" + "".join(f"{c:>12}" for c in columns))
    for metric, k in keys:
        cells = "".join(_metric_cell(metric, values[(metric, k)][c]) if c in values[(metric, k)] else f"{'-':>12}"
                        for c in columns)
        print(f"{metric:<28}{'' if k is None else k!s:>6}{cells}")


def _metric_cell(metric: str, value: float) -> str:
    """A metric value in a 12-wide column: counts (``metrics.names.is_count_metric``) as integers."""
    from dml_ray.metrics.names import display_value

    shown = display_value(metric, value)
    return f"{shown:>12d}" if isinstance(shown, int) else f"{shown:>12.4f}"


def _run(config_path: str, overrides: dict[str, Any]) -> int:
    from pipelines.run import run_pipeline

    cfg = load_config(config_path, overrides)
    summary = run_pipeline(cfg)
    run = open_run(cfg.output_root, summary.run_id, cfg.storage)
    _print_metrics(summary, run.read("metrics", "mpn") if run.committed("metrics", "mpn") else None)
    print(f"\nrun {summary.run_id}: ran {summary.ran or 'nothing'}, skipped {summary.skipped or 'nothing'}")
    print(f"outputs: {summary.run_uri}")
    if summary.figure:
        print(f"figure: {summary.figure}")
    if summary.report:
        print(f"report: {summary.report}")
    print(f"query them: dml-ray query --root {cfg.output_root} \"SELECT * FROM metrics\"")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    overrides = {"output_root": os.path.abspath(args.out), "run_id": args.run_id or ("demo-mpn" if args.mpn else "demo")}
    return _run(_demo_config_path("demo_mpn" if args.mpn else "demo"), overrides)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_sets(args.set)
    if args.stages:
        overrides["stages"] = args.stages.split(",")
    if args.run_id:
        overrides["run_id"] = args.run_id
    return _run(args.config, overrides)


def cmd_tune(args: argparse.Namespace) -> int:
    from pipelines.tune import parse_grid, run_sweep

    overrides = parse_sets(args.set)
    if args.run_id:
        overrides["run_id"] = args.run_id
    cfg = load_config(args.config, overrides)
    grid = parse_grid(args.grid)
    result = run_sweep(cfg, grid, samples=args.samples, max_concurrent=args.max_concurrent, metric=args.metric)
    names = sorted({m for t in result.trials for m in t["metrics"]})
    print(f"\nsweep {result.sweep_id}: {len(result.trials)} trials, best first by {result.metric}")
    print("  ".join([f"{'run':<24}", *[f"{k:<22}" for k in grid], *[f"{m:>16}" for m in names]]))
    for t in result.trials:
        values = [f"{t['metrics'][m]:>16.4f}" if m in t["metrics"] else f"{'-':>16}" for m in names]
        cells = [f"{str(t['run_id'] or 'failed'):<24}", *[f"{str(t['overrides'].get(k)):<22}" for k in grid], *values]
        print("  ".join(cells) + (f"  error: {t['error']}" if t["error"] else ""))
    print(f"compare the trials: dml-ray compare --root {cfg.output_root} {result.sweep_id}")
    return 0 if all(t["error"] is None for t in result.trials) else 1


def cmd_synth(args: argparse.Namespace) -> int:
    from dml_ray.data.synthetic import generate_synthetic

    root = generate_synthetic(args.out, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote a CUB-200-2011-format dataset of {args.classes} x {args.per_class} images to {root}")
    return 0


def _root_and_storage(args: argparse.Namespace) -> tuple[str, Optional[dict]]:
    """The output root (``--root``, else the ``--config``'s) and the config's storage options (credentials stay
    in the config or the environment, never on the command line)."""
    if args.config:
        cfg = load_config(args.config)
        return args.root or cfg.output_root, storage_options_of(cfg)
    return args.root or "demo_out", None


def cmd_query(args: argparse.Namespace) -> int:
    from dml_ray.io.query import connect, run_read_only

    root, storage_options = _root_and_storage(args)
    con, runs = connect(root, args.run, storage_options, all_runs=args.all_runs)
    result = run_read_only(con, args.sql)
    if result is None:
        return 0
    if args.format == "csv":
        result.df().to_csv(sys.stdout, index=False)
    else:
        print(f"-- run{'s' if len(runs) > 1 else ''} {', '.join(runs)}")
        result.show(max_rows=args.max_rows, max_width=200)
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    from dml_ray.io.lock import clear_lock, describe

    root, storage_options = _root_and_storage(args)
    holder = clear_lock(root, storage_options)
    print(f"{root}: removed the lock of {describe(holder)}" if holder is not None else f"{root}: not locked")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import numpy as np

    from dml_ray.data.transforms import decode_image, display_view, eval_transform
    from dml_ray.explain.oam import explain_deml_pair
    from dml_ray.explain.pair import explain_pair
    from dml_ray.io.fs import url_to_fs
    from dml_ray.models.checkpoint import load_checkpoint
    from dml_ray.models.deml import DeMLModel
    from dml_ray.report.overlays import deml_pair_figure, pair_figure

    allowed = StorageConfig().allowed_schemes
    for field in ("checkpoint", "query", "reference"):
        check_scheme(f"--{field}", getattr(args, field), allowed)
    loaded = load_checkpoint(args.checkpoint)
    size = loaded.image_size
    resize = loaded.extra.get("resize", size)  # an int (shorter side) or [h, w] (the resize frame)
    resize = int(resize) if isinstance(resize, (int, float)) else tuple(int(v) for v in resize)
    transform = eval_transform(resize, size)
    images, views = [], []
    for uri in (args.query, args.reference):
        fs, path = url_to_fs(uri)
        with fs.open(path, "rb") as f:
            image = decode_image(f.read())
        images.append(transform(image))
        views.append(display_view(image, resize, size).numpy())
    if isinstance(loaded.model, DeMLModel):
        if args.methods not in (None, "oam"):
            raise ValueError(f"--methods {args.methods}: a DeML checkpoint is explained by its object-attention "
                             "map and its channel-attention branches (--methods oam)")
        arrays = explain_deml_pair(loaded.model, images[0], images[1])
        figure = deml_pair_figure(views[0], views[1], arrays, loaded.model.branches)
    else:
        methods = (args.methods or DEFAULT_PAIR_METHODS).split(",")
        arrays = explain_pair(loaded.model, images[0], images[1], methods)
        figure = pair_figure(views[0], views[1], arrays, methods)
    with open(args.out, "wb") as f:
        f.write(figure)
    print(f"figure: {args.out} (cosine similarity {float(arrays['cosine']):.4f})")
    if args.save_arrays:
        np.savez_compressed(args.save_arrays, **arrays)
        print(f"arrays: {args.save_arrays} ({', '.join(sorted(arrays))})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dml_ray.config import ReportConfig
    from dml_ray.explore.projection import resolve_method
    from pipelines.report import write_report

    run = open_run(args.root, args.run)
    cfg = None
    if args.projection:  # the run's report settings, with this projection
        resolve_method(args.projection)  # a one-line error when umap-learn is missing
        cfg = ReportConfig.model_validate({**((run.manifest.get("config") or {}).get("report") or {}),
                                           "projection": args.projection})
    print(f"report: {write_report(run, cfg)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from dml_ray.io.run import open_run

    root, storage_options = _root_and_storage(args)
    result = open_run(root, args.run, storage_options).search([args.image], k=args.k)
    rows = result.select(["rank", "image_id", "label", "split", "score"]).to_pylist()
    if args.format == "json":
        print(json.dumps(rows))
    elif args.format == "csv":
        result.select(["rank", "image_id", "label", "split", "score"]).to_pandas().to_csv(sys.stdout, index=False)
    else:
        print(f"{'rank':>4}  {'image_id':<40} {'label':>6}  {'split':<8} {'score':>8}")
        for r in rows:
            print(f"{r['rank']:>4}  {r['image_id']:<40} {r['label']:>6}  {r['split']:<8} {r['score']:>8.4f}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from dml_ray.explore.folder_embed import embed_folder
    from pipelines.ray_env import ensure_ray

    allowed = StorageConfig().allowed_schemes
    for name, value in (("--checkpoint", args.checkpoint), ("images", args.images), ("--out", args.out)):
        check_scheme(name, value, allowed)
    ensure_ray()
    result = embed_folder(args.images, args.checkpoint, args.out)
    print(f"embeddings: {result.out} ({result.rows} rows, {result.errors} images failed)")
    return 0


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def cmd_serve(args: argparse.Namespace) -> int:
    from dml_ray.config import ServeConfig
    from dml_ray.io.run import open_run

    if args.host not in LOOPBACK and not args.token:
        raise ValueError(f"--host {args.host}: beyond loopback the explorer needs --token")
    cfg = ServeConfig(host=args.host, port=args.port, ray_serve=args.ray_serve, replicas=args.replicas,
                      cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica)
    root, storage_options = _root_and_storage(args)
    suffix = f"?token={args.token}" if args.token else ""
    if cfg.ray_serve:
        import time

        from pipelines.explorer_serve import deploy_explorer, undeploy_explorer

        try:  # Ctrl-C, even during the deployment, removes the application
            url = deploy_explorer(root, args.run, storage_options, cfg, token=args.token)
            print(f"explorer on Ray Serve ({cfg.replicas} replica(s)): {url}{suffix}  (Ctrl-C stops it)", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:  # a joined cluster's other Serve applications keep running
            undeploy_explorer(shutdown=not os.environ.get("RAY_ADDRESS"))
        return 0
    import uvicorn

    from dml_ray.serve.app import create_app
    from dml_ray.serve.explorer import Explorer

    app = create_app(Explorer(open_run(root, args.run, storage_options)), token=args.token)
    print(f"explorer: http://{args.host}:{args.port}/{suffix}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dml_ray.io.run import open_run
    from pipelines.compare import HEADER, write_comparison
    from pipelines.tune import sweep_trials

    named = [validate_run_id(run_id) for run_id in args.runs]  # every id is a name before any is opened
    runs = []
    for run_id in named:  # a sweep's id stands for its trials
        runs += sweep_trials(open_run(args.root, run_id)) or [run_id]
    uri, rows = write_comparison(args.root, runs)
    widths = [max(len(h), 10) for h in HEADER]
    print("  ".join(h.rjust(w) for h, w in zip(HEADER, widths)))
    for row in rows:
        cells = ["-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    print(f"comparison: {uri}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dml-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own lines on the console (they always go to the run's "
                             "logs/run.log)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic data -> train -> embed -> evaluate, end to end")
    p.add_argument("--out", default="demo_out", help="output root (default: ./demo_out)")
    p.add_argument("--run-id", default=None, help="run id (default: demo); an existing run resumes")
    p.add_argument("--mpn", action="store_true", help="train a message passing network instead (jobs/configs/"
                                                      "demo_mpn.yaml) and refine the test embeddings with it")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run the stages of a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--stages", help="comma-separated subset of: " + ",".join(get_args(Stage)))
    p.add_argument("--run-id")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tune", help="a hyper-parameter sweep on Ray Tune: each trial a run (train, embed, evaluate)")
    p.add_argument("--config", required=True)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values of one config key, e.g. --grid train.optimizer.lr=1e-4,3e-4 (repeatable); a grid "
                        "runs every combination")
    p.add_argument("--samples", type=int, help="random search instead: this many trials, each value drawn from its "
                                                "--grid list")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as cluster CPUs allow)")
    p.add_argument("--metric", help="ranks the trials (default: val_recall_at_1 with train.validation, else "
                                    "recall_at_1 on the test classes)")
    p.add_argument("--run-id", help="the sweep's id (default: the config's); trials are <id>-t00, <id>-t01, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("synth", help="write a synthetic dataset in the CUB-200-2011 layout")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=12)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("explain", help="activation maps of one image pair, every method side by side")
    p.add_argument("--checkpoint", required=True, help="a model checkpoint (runs/<run>/model/model.pt)")
    p.add_argument("--query", required=True, help="query image (path or URI)")
    p.add_argument("--reference", required=True, help="reference image (path or URI)")
    p.add_argument("--out", required=True, help="PNG figure to write")
    p.add_argument("--save-arrays", help="also write the raw arrays to this .npz file")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated maps (default {DEFAULT_PAIR_METHODS}); a DeML checkpoint draws its "
                        "object-attention map and each channel-attention branch (oam)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("report", help="write a run's self-contained HTML report")
    p.add_argument("--root", default="demo_out", help="output root (default: ./demo_out)")
    p.add_argument("--run", default=None, help="run id (default: the latest run)")
    p.add_argument("--projection", choices=["pca", "umap", "auto"], default=None,
                   help="embedding projection (default: the run's report.projection, pca); umap needs umap-learn, "
                        "auto uses it when installed")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="model diagnosis: runs side by side, train vs test")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids; a sweep's id (dml-ray tune) means its trials")
    p.add_argument("--root", default="demo_out", help="output root (default: ./demo_out)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("search", help="the nearest images of a run's embeddings to a query image")
    p.add_argument("--image", required=True, help="query image (path or URI), embedded with the run's model")
    p.add_argument("--root", default=None, help="output root (default: the --config's, else ./demo_out)")
    p.add_argument("--config", help="a run config: its output_root and storage.options")
    p.add_argument("--run", default=None, help="run id (default: the latest run)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("embed", help="embed a folder of images (Ray Data) into a Parquet file, embeddings schema")
    p.add_argument("images", help="folder or URI of images (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="a model checkpoint (runs/<run>/model/model.pt)")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("serve", help="the web explorer of a run (gallery, top-k with maps, regions, uploads)")
    p.add_argument("--root", default=None, help="output root (default: the --config's, else ./demo_out)")
    p.add_argument("--config", help="a run config: its output_root and storage.options")
    p.add_argument("--run", default=None, help="run id (default: the latest run)")
    p.add_argument("--host", default="127.0.0.1", help="default loopback; any other needs --token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="required on every request (Bearer header or ?token=)")
    p.add_argument("--ray-serve", action="store_true", help="deploy the same app on Ray Serve (joins RAY_ADDRESS, "
                                                            "else a private local Ray instance)")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray-serve; default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (with --ray-serve)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs per replica (with --ray-serve; default 0): uploads' forward pass runs on CUDA")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("query", help="SQL (DuckDB) over the committed tables of a run, or of every run")
    p.add_argument("sql")
    p.add_argument("--root", default=None, help="output root (default: the --config's, else ./demo_out)")
    p.add_argument("--config", help="a run config: its output_root and storage.options (for s3:// roots)")
    p.add_argument("--run", default=None, help="run id (default: the latest run)")
    p.add_argument("--all-runs", action="store_true", help="views over every run (tell them apart by run_id)")
    p.add_argument("--format", choices=["table", "csv"], default="table")
    p.add_argument("--max-rows", type=int, default=40)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("unlock", help="remove an output root's lock left by a run that died on another host")
    p.add_argument("--root", default=None, help="output root (default: the --config's)")
    p.add_argument("--config", help="a run config: its output_root and storage.options")
    p.set_defaults(func=cmd_unlock)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dml-ray: interrupted (exit 130): committed tables are kept; the same command resumes",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every failure is an exit code and one line (dml_ray/errors.py)
        code = exit_code(err)
        if args.verbose:
            traceback.print_exc()
        line = one_line(err)
        if code == EXIT_BAD_INPUT:
            print(f"dml-ray: error: {line}", file=sys.stderr)
        else:
            hint = " (--verbose shows the traceback)" if code == EXIT_RETRY and not args.verbose else ""
            print(f"dml-ray: {EXIT_NAMES[code]} (exit {code}): {line}{hint}", file=sys.stderr)
        return code
    finally:
        reset_console()


if __name__ == "__main__":
    sys.exit(main())
