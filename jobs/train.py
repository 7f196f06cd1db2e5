"""``python -m jobs.train --config FILE``: the train stage of a run (issue 7; exit codes in jobs.entry)."""
from __future__ import annotations

import sys

from jobs.entry import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("train"))
