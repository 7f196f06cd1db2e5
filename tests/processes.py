"""Finding and ending only the processes a test started: those whose command line names the test's own temp dir."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def pids_mentioning(text: str) -> list[int]:
    """Pids of this machine's processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_processes_mentioning(text: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process whose command line contains ``text`` (a temp dir only this test uses); wait for them."""
    pids = pids_mentioning(text)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while pids_mentioning(text) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids
