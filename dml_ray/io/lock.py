"""One writer per output root (DESIGN.md "Runs, commits, incremental nightly jobs": take a lock).

The lock is ``<output_root>/_lock.json``, created exclusively (``O_EXCL`` on local file systems,
``If-None-Match: *`` on S3 through s3fs), holding who took it: owner, host, pid, run id and time.
It is removed when the holder finishes or fails. A lock left by a killed process on this same host
(its pid is gone) is stale and taken over; any other held lock is refused with LockHeld. A stale
lock from another host is cleared with ``dml-ray unlock --root OUTPUT_ROOT``.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

from dml_ray.errors import LockHeld
from dml_ray.io.fs import join, url_to_fs

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"


def lock_uri(output_root: str) -> str:
    """URI of the output root's lock file."""
    return join(output_root, LOCK_FILE)


def read_lock(output_root: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The current holder's record, None when unlocked, ``{}`` when the file is unreadable (being written)."""
    fs, path = url_to_fs(lock_uri(output_root), storage_options)
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def describe(holder: dict) -> str:
    """``owner@host pid N (run R) since T`` for messages."""
    return (f"{holder.get('owner', '?')}@{holder.get('host', '?')} pid {holder.get('pid', '?')} "
            f"(run {holder.get('run_id', '?')}) since {holder.get('since', '?')}")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _is_stale(holder: dict) -> bool:
    """Whether the holder was a process on this host that no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _create(fs, path: str, record: dict) -> bool:
    try:
        with fs.open(path, "xb") as f:
            f.write(json.dumps(record).encode())
        return True
    except FileExistsError:
        return False


def clear_lock(output_root: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    """Remove the lock whoever holds it; returns the removed holder's record (None if there was none)."""
    holder = read_lock(output_root, storage_options)
    if holder is not None:
        fs, path = url_to_fs(lock_uri(output_root), storage_options)
        fs.rm(path)
    return holder


@contextmanager
def output_lock(output_root: str, run_id: str, storage_options: Optional[dict] = None) -> Iterator[dict]:
    """Hold ``output_root``'s lock for the duration of the block; raise LockHeld if another run holds it."""
    fs, path = url_to_fs(lock_uri(output_root), storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    mine = {"owner": _user(), "host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    if not _create(fs, path, mine):
        holder = read_lock(output_root, storage_options)
        if holder and _is_stale(holder):
            log.warning("taking over the stale lock of %s: that process is gone", describe(holder))
            fs.rm(path)
        if not _create(fs, path, mine):
            holder = read_lock(output_root, storage_options) or {}
            raise LockHeld(f"{output_root} is locked by {describe(holder)}; another run is writing there. "
                           f"If it is gone, clear the lock: dml-ray unlock --root {output_root}")
    log.info("locked %s for run %s", output_root, run_id)
    try:
        yield mine
    finally:
        current = read_lock(output_root, storage_options)
        if current and current.get("token") == mine["token"]:
            fs.rm(path)
            log.info("unlocked %s", output_root)
