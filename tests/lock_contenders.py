"""Contenders for the stale-lock takeover tests: each process (or thread) tries every trial's lock at once."""
from __future__ import annotations

from typing import Optional


def contend(roots: list[str], start, decided, storage_options: Optional[dict] = None) -> list[bool]:
    """For each root: wait until every contender is ready, try to take its lock, wait until every contender has
    tried (so a winner cannot release before a loser tried), release. Returns whether this one held each lock."""
    from dml_ray.io.lock import LockHeld, output_lock

    held = []
    for root in roots:
        start.wait(timeout=60)
        try:
            with output_lock(root, "contender", storage_options):
                held.append(True)
                decided.wait(timeout=60)
        except LockHeld:
            held.append(False)
            decided.wait(timeout=60)
    return held


def contend_into(queue, index: int, roots: list[str], start, decided) -> None:
    """``contend`` in a child process: puts ``(index, outcomes)`` on ``queue``."""
    queue.put((index, contend(roots, start, decided)))
