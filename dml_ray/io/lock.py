"""One writer per output root (DESIGN.md "Runs, commits, incremental nightly jobs": take a lock).

The lock is ``<output_root>/_lock.json``, created exclusively (``O_EXCL`` on local file systems,
``If-None-Match: *`` on S3 through s3fs), holding who took it: owner, host, pid, run id, time and
a token. It is removed when the holder finishes or fails. A lock left by a killed process on this
same host (its pid is gone) is stale and taken over; any other held lock is refused with LockHeld.
A stale lock from another host is cleared with ``dml-ray unlock --root OUTPUT_ROOT``.

Taking over is atomic, so that of several runs that find the same stale lock exactly one wins:

- local: the read -> check -> replace runs under an exclusive ``flock`` of ``_lock.json.takeover``
  (a small file that stays in the root), and the new record replaces the old one with one
  ``rename``. The kernel releases a flock when its process dies, so a contender killed in the
  middle never wedges the root (an O_EXCL takeover marker would need its own stale-marker rule).
- S3: the new record is PUT with ``If-Match: <ETag of the stale record>``; a contender whose PUT
  comes second gets 412 Precondition Failed and reports the lock as held.
- any other file system: no takeover; the stale lock is reported for ``dml-ray unlock``.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import json
import logging
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

from fsspec.asyn import sync

from dml_ray.errors import LockHeld
from dml_ray.io.fs import is_local, join, url_to_fs

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"
TAKEOVER_SUFFIX = ".takeover"


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


def _take_over_local(fs, path: str, mine: dict) -> bool:
    """Replace a stale local lock by ``mine`` under an exclusive flock; whether ``mine`` now holds the lock."""
    with open(path + TAKEOVER_SUFFIX, "a+b") as guard:
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
        try:
            try:
                with open(path, "rb") as f:
                    holder = json.loads(f.read() or b"{}")
            except FileNotFoundError:
                return _create(fs, path, mine)  # released meanwhile
            except ValueError:
                return False
            if not _is_stale(holder):
                return False
            log.warning("taking over the stale lock of %s: that process is gone", describe(holder))
            tmp = f"{path}.{mine['token']}.tmp"
            with open(tmp, "wb") as f:
                f.write(json.dumps(mine).encode())
            os.replace(tmp, path)
            return True
        finally:
            fcntl.flock(guard.fileno(), fcntl.LOCK_UN)


def _take_over_s3(fs, path: str, mine: dict) -> bool:
    """PUT ``mine`` over a stale S3 lock only if the lock is still the record judged stale (If-Match its ETag)."""
    bucket, key, _ = fs.split_path(path)
    try:
        data, etag = sync(fs.loop, _get_with_etag, fs, bucket, key)
    except FileNotFoundError:
        return _create(fs, path, mine)
    try:
        holder = json.loads(data or b"{}")
    except ValueError:
        return False
    if not _is_stale(holder):
        return False
    log.warning("taking over the stale lock of %s: that process is gone", describe(holder))
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=json.dumps(mine).encode(), IfMatch=etag)
    except (OSError, ValueError) as err:
        if _precondition_failed(err):
            return False
        raise
    return True


async def _get_with_etag(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """An S3 object's bytes and the ETag of exactly those bytes (one GET)."""
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with response["Body"] as body:
        return await body.read(), response["ETag"]


def _precondition_failed(err: BaseException) -> bool:
    """Whether an s3fs error is S3's answer to a failed condition (412, or 409 for a concurrent conditional write)."""
    text = f"{err} {err.__cause__ or ''}"
    return any(code in text for code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"))


def _take_over(fs, path: str, mine: dict) -> bool:
    if is_local(fs):
        return _take_over_local(fs, path, mine)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    if protocol in ("s3", "s3a"):
        return _take_over_s3(fs, path, mine)
    return False


@contextmanager
def output_lock(output_root: str, run_id: str, storage_options: Optional[dict] = None) -> Iterator[dict]:
    """Hold ``output_root``'s lock for the duration of the block; raise LockHeld if another run holds it."""
    fs, path = url_to_fs(lock_uri(output_root), storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    mine = {"owner": _user(), "host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    if not _create(fs, path, mine) and not _take_over(fs, path, mine):
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
