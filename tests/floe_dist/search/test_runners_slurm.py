"""``floe-dist search --runner slurm`` against a real local Slurm (tests/slurm_cluster.py)."""
from __future__ import annotations

import json
import signal
import subprocess
import time

from tests.conftest import REPO, clean_env, floe_command, run_floe
from tests.floe_dist.stages.test_search import SPACE, ledger


def test_trials_run_as_a_slurm_job_array_and_a_crash_is_recorded(slurm, tmp_path):
    """2 workers: trials 0 and 1 go out as one 2-task array, trial 2 alone when a slot frees."""
    run_floe(["search", "--mode", "grid", "--runner", "slurm-array", "--output", str(tmp_path), *SPACE,
              "--ranks", "1,2,4", "--lr", "1e-2", "--max-steps", "90"], env={"TOY_CRASH_RANK": "1"})
    trials = {t["config"]["rank"]: t for t in ledger(tmp_path)["trials"]}
    array_job = trials[1]["worker"].split(":")[1].split("_")[0]
    assert [trials[1]["worker"], trials[2]["worker"]] == [f"slurm:{array_job}_0", f"slurm:{array_job}_1"]
    assert len((tmp_path / "trials" / "array-0000.tasks").read_text().splitlines()) == 2
    assert trials[4]["worker"].startswith("slurm:")
    assert trials[1]["status"] == "crashed" and "planted crash for rank 1" in trials[1]["reason"]
    assert trials[2]["status"] == trials[4]["status"] == "success"
    assert ledger(tmp_path)["summary"]["incumbent"]["config"]["rank"] == 4


def test_a_resumed_search_adopts_its_running_jobs_instead_of_resubmitting(slurm, tmp_path):
    args = ["search", "--mode", "grid", "--runner", "slurm", "--output", str(tmp_path), *SPACE,
            "--ranks", "1,2,4,8", "--lr", "1e-2", "--max-steps", "30"]
    env = {**clean_env(1), "TOY_DELAY": "8"}
    proc = subprocess.Popen(floe_command(args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the first two jobs are submitted
        if (tmp_path / "search.json").is_file() and \
                sum(t["worker"].startswith("slurm:") for t in ledger(tmp_path)["trials"]) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    submitted = {t["id"]: t["worker"] for t in ledger(tmp_path)["trials"] if t["worker"]}
    assert len(submitted) >= 2
    run_floe(args, env={"TOY_DELAY": "8"})
    after = ledger(tmp_path)["trials"]
    assert len(after) == 4 and all(t["status"] == "success" for t in after)
    for t in after:
        assert t["attempts"] == 1  # nothing submitted twice
        if t["id"] in submitted:
            assert t["worker"] == submitted[t["id"]]  # the same Slurm job, adopted
        log = (tmp_path / "trials" / f"{t['id']:04d}" / "starts.log").read_text().split()
        assert len(log) == 1
    assert json.loads((tmp_path / "search.json").read_text())["summary"]["trials"] == 4


def test_warm_worker_jobs_take_trial_after_trial_and_a_crash_gets_a_new_job(slurm, tmp_path):
    """One warm worker job: ranks 1 and 2 run on it (2 crashes it), ranks 4 and 8 on its replacement."""
    run_floe(["search", "--mode", "grid", "--runner", "slurm", "--trial-workers", "warm", "--output", str(tmp_path),
              *SPACE, "--ranks", "1,2,4,8", "--lr", "1e-2", "--max-steps", "90", "--workers", "1"],
             env={"TOY_CRASH_RANK": "2"})
    trials = {t["config"]["rank"]: t for t in ledger(tmp_path)["trials"]}
    workers = [trials[r]["worker"] for r in (1, 2, 4, 8)]
    assert all(w.startswith("slurm-worker:") for w in workers)
    assert workers[0] == workers[1] != workers[2] == workers[3], workers
    assert trials[2]["status"] == "crashed" and "planted crash for rank 2" in trials[2]["reason"]
    assert all(trials[r]["status"] == "success" for r in (1, 4, 8))
    jobs = {w.split(":")[1] for w in workers}
    deadline = time.time() + 20
    while time.time() < deadline:  # the search cancels its idle workers when it ends
        queued = set(subprocess.run(["squeue", "-h", "--me", "-o", "%i"], capture_output=True, text=True).stdout.split())
        if not jobs & queued:
            break
        time.sleep(0.5)
    assert not jobs & queued
