"""Spare work for the search tests (floe_dist/search/spare_work.py): it says which process ran it;
``SPARE_FAIL=1`` makes it raise."""
from __future__ import annotations

import os
from pathlib import Path


def run_trial(job_dir: Path, resources=None) -> dict:
    if os.environ.get("SPARE_FAIL") == "1":
        raise RuntimeError("planted failure of the spare work")
    return {"pid": os.getpid()}
