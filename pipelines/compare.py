"""Model diagnosis (activation-decomposition-tip2021 Sec. VI-C, Tables III and IV): runs side by side."""
from __future__ import annotations

from typing import Optional

from dml_ray.io.fs import join
from dml_ray.io.run import Run, runs_of
from dml_ray.report.html import Section, render_report

LOCALIZED = ("neighbor/decomposition", "neighbor/decomposition_bias")
HEADER = ["run", "model", "loss", "R@1 train", "R@1 test", "R@1 drop",
          *[f"loc. {m.split('/')[1]} {s}" for m in LOCALIZED for s in ("train", "test")]]


def _value(rows: list[dict], split: str, metric: str, k: Optional[int] = None) -> Optional[float]:
    return next((r["value"] for r in rows if r["split"] == split and r["metric"] == metric and r["k"] == k), None)


def compare_runs(runs: list[Run]) -> list[list[object]]:
    """One row per run: Recall@1 on train and test splits and its drop (Table III), localization accuracy at
    the best threshold on the train and test splits (Table IV)."""
    table = []
    for run in runs:
        metrics = run.read("metrics").to_pylist()
        config = run.manifest.get("config", {})
        r1_train, r1_test = _value(metrics, "train", "recall", 1), _value(metrics, "test", "recall", 1)
        drop = None if r1_train is None or r1_test is None else r1_train - r1_test
        row = [run.run_id, config.get("model", {}).get("backbone"), config.get("train", {}).get("loss", {}).get("name"),
               r1_train, r1_test, drop]
        row += [_value(metrics, split, f"loc_best_acc/{m}") for m in LOCALIZED for split in ("train", "test")]
        table.append(row)
    return table


def write_comparison(output_root: str, run_ids: list[str], storage: object = None) -> tuple[str, list]:
    """Write ``<output_root>/compare-<a>-vs-<b>.html`` and return its URI and the rows (``storage``: as
    ``open_run`` takes it)."""
    runs = runs_of(output_root, run_ids, storage)
    rows = compare_runs(runs)
    section = Section("Train vs test", "compare", text="Recall@1 on the training classes and on the unseen test "
                      "classes, and the localization accuracy of the activation maps on both splits: a model "
                      "whose maps leave the object on its own training images generalises worse "
                      "(activation-decomposition-tip2021 Tables III, IV).", tables=[(HEADER, rows)])
    uri = runs[0].write_bytes(join(output_root, f"compare-{'-vs-'.join(run_ids)}.html"),
                              render_report("dml_ray model comparison", [section], " vs ".join(run_ids)).encode())
    return uri, rows
