"""The one entry every job shares (issue 7): ``python -m jobs.<stage>`` and ``python -m jobs.nightly``.

They run unchanged locally and under ``ray job submit --working-dir . -- python -m jobs.<name> --config FILE``
(inside a Ray job, RAY_ADDRESS names the cluster). Progress is logged; the last line printed is a
one-line summary. Exit codes, for schedulers (the taxonomy the CLI shares, dml_ray/errors.py):

    0    success
    1    unexpected failure (a crash, a lost node, ...): worth a retry
    2    bad configuration or input: fix it first, a retry fails the same way
    3    the output root is locked by another run: retry later (a stale lock: ``dml-ray unlock``)
    4    error budget exceeded: too many unreadable images; nothing was committed
    130  interrupted (Ctrl-C): committed stages are kept; the same command resumes
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import time
from typing import Callable, Optional

import dml_ray
from dml_ray.cli import parse_sets
from dml_ray.config import RunConfig, load_config
from dml_ray.console import reset_console, setup_console
from dml_ray.errors import EXIT_NAMES, EXIT_OK, EXIT_RETRY, exit_code, one_line

log = logging.getLogger("jobs")


def utc_date() -> str:
    """Today's date in UTC, YYYY-MM-DD: the default run id of every job."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=description)
    parser.add_argument("--config", required=True, help="a run config YAML (see jobs/configs/)")
    parser.add_argument("--run-id", help="default: the config's run_id, else today's UTC date (YYYY-MM-DD)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set embed.batch_size=64 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own lines on the console (always in the run's logs/run.log)")
    return parser


def load_job_config(path: str, run_id: Optional[str], sets: list[str]) -> RunConfig:
    """The job's config: ``--set`` overrides applied, run id from ``--run-id``, the config, or today (UTC)."""
    overrides = parse_sets(sets)
    if run_id:
        overrides["run_id"] = run_id
    cfg = load_config(path, overrides)
    if "run_id" not in cfg.model_fields_set:
        cfg.run_id = utc_date()
    return cfg


def _summary_line(name: str, cfg: RunConfig, summary, seconds: float) -> str:
    parts = [f"{name}: ok", f"run_id={cfg.run_id}", f"ran={','.join(summary.ran) or '-'}",
             f"skipped={','.join(summary.skipped) or '-'}"]
    embed = summary.stages.get("embed")
    if embed:
        parts += [f"embedded={embed['rows'] - embed['reused']}", f"reused={embed['reused']}",
                  f"errors={embed['errors']}"]
    parts += [f"latest={'moved' if summary.latest else 'unchanged'}", f"seconds={seconds:.1f}",
              f"outputs={summary.run_uri}"]
    return " ".join(parts)


def job_main(name: str, description: str, only: Optional[str] = None,
             check: Optional[Callable[[RunConfig], None]] = None, argv: Optional[list[str]] = None) -> int:
    """Parse the job's arguments, run the stages (``only`` one, or all the config lists), print the summary line."""
    from pipelines.run import run_pipeline

    args = _parser(name, description).parse_args(argv)
    setup_console(args.verbose)
    start = time.perf_counter()
    run_id = args.run_id or "?"
    try:
        cfg = load_job_config(args.config, args.run_id, args.set)
        run_id = cfg.run_id
        if check:
            check(cfg)
        log.info("job %s: run %s, output root %s, code from %s, Ray at %s", name, cfg.run_id, cfg.output_root,
                 os.path.dirname(dml_ray.__file__), os.environ.get("RAY_ADDRESS", "a private local instance"))
        summary = run_pipeline(cfg, only=only)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure: an exit code and a summary line
        code = exit_code(err)
        if args.verbose:
            log.exception("job %s failed", name)
        if isinstance(err, KeyboardInterrupt):
            message = "committed stages are kept; the same command resumes"
        else:
            message = one_line(err)
            if code == EXIT_RETRY and not args.verbose:
                message += " (-v shows the traceback)"
        print(f"{name}: {EXIT_NAMES[code]} (exit {code}) run_id={run_id} "
              f"seconds={time.perf_counter() - start:.1f}: {message}", flush=True)
        return code
    finally:
        reset_console()
    print(_summary_line(name, cfg, summary, time.perf_counter() - start), flush=True)
    return EXIT_OK


def stage_main(stage: str, argv: Optional[list[str]] = None) -> int:
    """``python -m jobs.<stage>``: run one stage of a run (its inputs must be committed in that run)."""
    return job_main(stage, f"Run the {stage} stage of a run (exit codes: jobs/entry.py).", only=stage, argv=argv)
