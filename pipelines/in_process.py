"""The small-run fast path: a stage's per-batch callables run in the driver, one batch after another.

Ray Data's fixed costs (planning a job, starting an actor that imports torch and loads the checkpoint,
scheduling tasks) are tens of seconds on a small machine, more than the work itself for a few thousand
small images. Below a stage's ``in_process_below`` the embed and explain stages call the same batch
functions and actor classes in the driver and stream their output into the same staging folders,
so both paths produce the same rows.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Optional, TypeVar

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dml_ray.io.tables import dictionary_columns, row_group_rows

log = logging.getLogger(__name__)

T = TypeVar("T")
PREFETCH_DEPTH = 2


def runs_in_process(n_images: int, in_process_below: int, use_gpu: bool) -> bool:
    """Whether a stage's batches run in the driver: fewer images than ``in_process_below``, and the GPU the stage
    asks for (if any) visible to the driver."""
    return n_images < in_process_below and (not use_gpu or torch.cuda.is_available())


def table_batches(table: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    """``table`` cut into consecutive batches of ``batch_size`` rows (the last one shorter)."""
    for start in range(0, table.num_rows, batch_size):
        yield table.slice(start, batch_size)


def file_batches(files: str | list[str], filesystem: pafs.FileSystem, batch_size: int,
                 columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
    """Batches of at most ``batch_size`` rows read from Parquet ``files`` (a list, or a folder), without loading
    them whole."""
    for batch in pads.dataset(files, filesystem=filesystem, format="parquet").to_batches(columns=columns,
                                                                                          batch_size=batch_size):
        yield pa.Table.from_batches([batch])


def apply_steps(batches: Iterable[pa.Table], steps: list[Callable]) -> Iterator[pa.Table]:
    """Each batch through ``steps`` in order, as ``map_batches`` chains them (each step takes the previous output)."""
    for batch in batches:
        for step in steps:
            batch = step(batch)
        yield batch


def prefetched(items: Iterable[T], depth: int = PREFETCH_DEPTH) -> Iterator[T]:
    """``items`` produced by a background thread up to ``depth`` ahead, so that reading and decoding the next
    batches overlaps the model's pass over this one (as Ray Data's read tasks overlap its model actor).

    An exception in the producer is raised here, at the item where it happened.
    """
    channel: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        channel.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            channel.put((end, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            channel.put((end, err))

    thread = threading.Thread(target=produce, name="in-process-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = channel.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def write_parquet_stream(tables: Iterable[pa.Table], folder: str, filesystem: pafs.FileSystem) -> int:
    """Stream ``tables`` into one Parquet file under ``folder`` (schema of the first); returns the rows written."""
    filesystem.create_dir(folder, recursive=True)
    writer, rows = None, 0
    try:
        for table in tables:
            if writer is None:
                # not part-*.parquet: commit_table renames a staging folder's files to part-NNNNN.parquet in
                # sorted order, and a file already so named would be overwritten by another one's rename
                writer = pq.ParquetWriter(f"{folder}/batches-00000.parquet", table.schema, filesystem=filesystem,
                                          use_dictionary=dictionary_columns(table.schema))
            writer.write_table(table.cast(writer.schema), row_group_size=row_group_rows(table))
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


class DriverThreads:
    """Restores the driver's torch thread count after an actor class built in the driver changed it."""

    def __enter__(self) -> "DriverThreads":
        self.threads = torch.get_num_threads()
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)
