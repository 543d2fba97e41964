"""Spare work for the search tests (floe_dist/search/spare_work.py): it says which process ran it;
``SPARE_FAIL=1`` makes it raise; ``SPARE_UNTIL_STOP=S`` makes it last until its folder's stop file appears (the
search's ``stop_spare``), or S seconds, and say which ended it."""
from __future__ import annotations

import os
import time
from pathlib import Path

from floe_dist.search.spare_work import SpareJob


def run_trial(job_dir: Path, resources=None) -> dict:
    if os.environ.get("SPARE_FAIL") == "1":
        raise RuntimeError("planted failure of the spare work")
    if os.environ.get("SPARE_UNTIL_STOP"):
        deadline, stop_file = time.time() + float(os.environ["SPARE_UNTIL_STOP"]), SpareJob("", job_dir).stop_file
        while not stop_file.is_file() and time.time() < deadline:
            time.sleep(0.05)
        return {"pid": os.getpid(), "stopped": stop_file.is_file()}
    return {"pid": os.getpid()}
