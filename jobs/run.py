"""Job entrypoint: ``python -m jobs.run --config FILE [--stages ...]`` (also under ``ray job submit``)."""
from __future__ import annotations

import sys

from dml_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
