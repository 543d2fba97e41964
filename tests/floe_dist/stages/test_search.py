"""``floe-dist search`` on the planted-rank toy (tests/search_toy.py): every trial is a real process."""
from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from floe_dist.allocation import Allocation
from tests.conftest import REPO, clean_env, floe_command, run_floe, run_here

# Grid: 5 ranks x 3 learning rates at 270 steps = 15 full trials. Rank 4 is planted.
SPACE = ["--model", "tiny", "--trial-module", "tests.search_toy", "--ranks", "1,2,4,8,16",
         "--lr", "3e-3:3e-2", "--grid-lr-points", "3", "--min-steps", "30", "--max-steps", "270", "--workers", "2",
         # without an allocation the search scales the adapter section: here one top-k expert per module
         "--adapter.experts", "1", "--adapter.router", "topk", "--adapter.top_k", "1", "--adapter.alpha", "16"]


def ledger(out: Path) -> dict:
    return json.loads((out / "search.json").read_text())


def smac_runhistory(out: Path) -> list:
    (path,) = (out / "smac").glob("*/*/runhistory.json")
    return json.loads(path.read_text())["data"]


def first_budgets(trials: list[dict]) -> list[int]:
    """The budget each configuration was first tried at (a bracket's starting rung)."""
    first = {}
    for t in sorted(trials, key=lambda t: t["id"]):
        first.setdefault(json.dumps(t["config"], sort_keys=True), t["budget"])
    return list(first.values())


def alive(pid: str) -> bool:
    """Running, not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    run_floe(["search", "--mode", "grid", "--output", str(out), *SPACE])
    return out


def test_grid_tries_every_point_and_finds_the_planted_rank(grid):
    trials = ledger(grid)["trials"]
    assert len(trials) == 15 and all(t["status"] == "success" and t["budget"] == 270 for t in trials)
    assert {t["origin"] for t in trials} == {"grid"}
    assert len({(t["config"]["rank"], t["config"]["lr"]) for t in trials}) == 15
    best = min(trials, key=lambda t: t["cost"])
    assert best["config"]["rank"] == 4
    chosen = Allocation.load(grid / "allocation.json")
    assert {m.ranks for mods in chosen.layers.values() for m in mods.values()} == {(4,)}
    assert chosen.meta["search"]["config"] == best["config"] and chosen.trainable_parameters > 0
    assert (grid / "search.png").stat().st_size > 0


@pytest.mark.parametrize("seed", [0])  # seeds 1 and 2 pass too (BENCHMARKS.md); one keeps the suite short
def test_smac_finds_the_grid_best_rank_with_at_most_35_percent_of_the_grid_compute(grid, tmp_path, seed):
    grid_trials = ledger(grid)["trials"]
    grid_compute = sum(t["budget"] for t in grid_trials)
    grid_best = min(grid_trials, key=lambda t: t["cost"])
    run_floe(["search", "--mode", "smac", "--seed", str(seed), "--output", str(tmp_path), *SPACE,
              "--max-compute", str(0.35 * len(grid_trials))])
    search = ledger(tmp_path)
    compute = sum(t["budget"] for t in search["trials"])
    assert compute <= 0.35 * grid_compute
    assert len({t["budget"] for t in search["trials"]}) == 3  # multi-fidelity: 30, 90, 270 steps
    assert set(first_budgets(search["trials"])) == {30}  # successive halving: every configuration starts at the bottom
    incumbent = search["summary"]["incumbent"]
    assert incumbent["config"]["rank"] == grid_best["config"]["rank"] and incumbent["budget"] == 270
    assert incumbent["cost"] <= grid_best["cost"] * 1.05  # within noise of the grid's best point
    origins = {t["origin"] for t in search["trials"]}  # every trial says who proposed it
    assert origins <= {"initial design", "model", "random"} and "initial design" in origins
    top = {json.dumps(t["config"], sort_keys=True) for t in search["trials"] if t["budget"] == 270}
    assert sum(search["summary"]["top_budget_origins"].values()) == len(top)
    assert search["summary"]["incumbent_origin"] == incumbent["origin"]


def test_kill_9_mid_search_then_resume_loses_and_reruns_nothing(tmp_path):
    args = ["search", "--output", str(tmp_path), *SPACE, "--max-compute", "3"]
    # numpy trials end in a fraction of a second: a delay keeps both workers busy when the kill lands
    proc = subprocess.Popen(floe_command(args), cwd=REPO, env={**clean_env(1), "TOY_DELAY": "1.5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # a moment with 5 results and a trial running (not the model's turn to propose)
        statuses = [t["status"] for t in ledger(tmp_path)["trials"]] if (tmp_path / "search.json").is_file() else []
        if statuses.count("success") >= 5 and "running" in statuses:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t["id"]: t for t in ledger(tmp_path)["trials"]}
    done_before = {i for i, t in before.items() if t["status"] == "success"}
    running_before = {i for i, t in before.items() if t["status"] == "running"}
    assert len(done_before) >= 5 and running_before, "the kill should land while trials are running"
    time.sleep(0.5)  # the killed search's trials die with it (PR_SET_PDEATHSIG)
    for i in running_before:  # (a trial asked for but not yet started has no worker)
        if before[i]["worker"]:
            assert not alive(before[i]["worker"].rsplit(":pid", 1)[1])

    run_floe(args)
    after = ledger(tmp_path)["trials"]
    assert len({t["id"] for t in after}) == len(after)
    assert len({(json.dumps(t["config"], sort_keys=True), t["budget"]) for t in after}) == len(after)
    assert all(t["status"] == "success" for t in after)
    by_id = {t["id"]: t for t in after}
    for i in done_before:  # kept with its result, never started again
        assert by_id[i]["cost"] == before[i]["cost"] and by_id[i]["attempts"] == 1
        assert len((tmp_path / "trials" / f"{i:04d}" / "starts.log").read_text().split()) == 1
    for i in running_before:
        starts = len((tmp_path / "trials" / f"{i:04d}" / "starts.log").read_text().split())
        if by_id[i]["attempts"] == before[i]["attempts"]:  # wrote its result just before the kill:
            assert before[i]["attempts"] == 1 and starts == 1  # collected on resume, not run again
        else:  # issued again and finished
            assert by_id[i]["attempts"] == before[i]["attempts"] + 1
    history = smac_runhistory(tmp_path)
    assert len(history) == len(after)  # SMAC knows every trial, none left RUNNING
    assert sorted(round(entry["cost"], 10) for entry in history) == sorted(round(t["cost"], 10) for t in after)


def test_a_smac_file_left_empty_by_a_kill_is_restored_on_resume(tmp_path):
    """SMAC writes its state in place: a kill -9 mid-save left optimization.json empty in a suite run, and the
    resume failed on it. The last complete copy is restored instead, and nothing is run again; without a
    copy the search stops with an error that names the file."""
    args = ["search", "--output", str(tmp_path), *SPACE, "--max-compute", "1.5"]
    run_floe(args)
    before = ledger(tmp_path)["trials"]
    folder = tmp_path / "smac" / "search" / "0"
    for name in ("optimization.json", "runhistory.json"):
        (folder / name).write_text("")
    run_floe(args)
    after = ledger(tmp_path)["trials"]
    key = lambda trials: [(t["id"], t["cost"], t["attempts"]) for t in trials]  # noqa: E731
    assert key(after) == key(before)
    costs = sorted(round(t["cost"], 10) for t in after)
    assert sorted(round(e["cost"], 10) for e in smac_runhistory(tmp_path)) == costs  # SMAC knows every trial
    (tmp_path / "smac" / "state.json").unlink()  # no saved copy: a clear error, nothing rerun or rebuilt
    (folder / "optimization.json").write_text("")
    proc = run_floe(args, check=False)
    assert proc.returncode == 2
    assert "optimization.json is unreadable" in proc.stderr and "another --output" in proc.stderr
    assert ledger(tmp_path)["trials"] == after


def test_a_heterogeneous_allocation_keeps_its_shape_through_the_search(tmp_path):
    hilo = tmp_path / "hilo.json"
    data = Allocation.uniform(4, ["q_proj"], experts=2, rank=2, top_k=1).to_json()
    for layer, ranks in zip(data["layers"], ([2, 2], [2, 4], [4, 6], [6, 8])):  # a HILO-like schedule
        data["layers"][layer]["q_proj"]["ranks"] = ranks
    hilo.write_text(json.dumps(data))
    run_floe(["search", "--mode", "grid", "--allocation", str(hilo), "--output", str(tmp_path / "s"), *SPACE,
              "--ranks", "4,16", "--lr", "1e-2"])
    chosen = Allocation.load(tmp_path / "s" / "allocation.json")
    rank = ledger(tmp_path / "s")["summary"]["rank"]
    ranks = [chosen.layers[i]["q_proj"].ranks for i in range(4)]
    assert max(max(r) for r in ranks) == rank and len({x for r in ranks for x in r}) > 1  # not flattened
    assert ranks == [tuple(max(1, round(x * rank / 8)) for x in r) for r in ([2, 2], [2, 4], [4, 6], [6, 8])]
    proc = run_floe(["search", "--allocation", str(hilo), "--experts", "2,4", "--output", str(tmp_path / "e"),
                     *SPACE], check=False)
    assert proc.returncode == 2 and "flattening" in proc.stderr


def test_the_allocation_itself_is_searched_and_the_winner_keeps_its_shape(tmp_path):
    """--candidates adds a categorical choice among allocation files and --top-ks one of experts per token; the
    toy makes 'uniform' 0.05 worse and top-k 1 0.01 worse."""
    hetero, uniform = tmp_path / "hetero.json", tmp_path / "uniform.json"
    data = Allocation.uniform(4, ["q_proj"], experts=2, rank=2, top_k=1).to_json()
    for layer, ranks in zip(data["layers"], ([2, 2], [2, 4], [4, 6], [6, 8])):
        data["layers"][layer]["q_proj"]["ranks"] = ranks
    hetero.write_text(json.dumps(data))
    Allocation.uniform(4, ["q_proj", "v_proj"], rank=8).save(uniform)
    out = tmp_path / "s"
    run_floe(["search", "--mode", "grid", "--candidates", f"hilo={hetero},uniform={uniform}", "--output", str(out),
              *SPACE, "--ranks", "4,16", "--top-ks", "1,2", "--lr", "1e-2", "--max-steps", "90"],
             env={"TOY_WORSE_ALLOCATION": "uniform", "TOY_BEST_TOP_K": "2"})
    search = ledger(out)
    assert sorted((t["config"]["allocation"], t["config"]["rank"], t["config"]["top_k"]) for t in search["trials"]) \
        == [(a, r, k) for a in ("hilo", "uniform") for r in (4, 16) for k in (1, 2)]
    summary = search["summary"]
    assert summary["allocation"] == "hilo" and summary["rank"] == 4 and summary["incumbent"]["config"]["top_k"] == 2
    report = summary["candidates"]
    assert report["uniform"]["best_cost"] == pytest.approx(report["hilo"]["best_cost"] + 0.05)
    chosen = Allocation.load(out / "allocation.json")
    assert [chosen.layers[i]["q_proj"].ranks for i in range(4)] == [(1, 1), (1, 2), (2, 3), (3, 4)]  # scaled, kept
    assert {chosen.layers[i]["q_proj"].top_k for i in range(4)} == {2}
    assert chosen.meta["search"]["allocation"] == "hilo" and set(chosen.meta["search"]["candidates"]) == {"hilo",
                                                                                                        "uniform"}
    bad = run_floe(["search", "--model", "tiny", "--candidates", f"a={hetero},b", "--allocation", str(hetero),
                    "--output", str(tmp_path / "bad")], check=False)
    assert bad.returncode == 2 and "NAME=FILE" in bad.stderr
    bad = run_floe(["search", "--model", "tiny", "--candidates", f"a={hetero},b=/nowhere.json", "--allocation",
                    str(hetero), "--output", str(tmp_path / "bad")], check=False)
    assert "b=/nowhere.json: file not found" in bad.stderr and "not both" in bad.stderr
    bad = run_floe(["search", "--allocation", str(uniform), "--top-ks", "1,2", "--output", str(tmp_path / "bad-k"),
                    *SPACE], check=False)  # one expert per module: nothing to route
    assert bad.returncode == 2 and "routes its tokens top-k" in bad.stderr
    assert not (tmp_path / "bad-k" / "trials").exists()


def test_crashed_and_timed_out_trials_are_recorded_as_failed_and_the_search_completes(tmp_path):
    args = ["search", "--output", str(tmp_path), *SPACE, "--ranks", "1,2,4", "--max-trials", "10",
            "--max-compute", "10", "--trial-timeout", "8", "--workers", "2"]
    proc = run_floe(args, env={"TOY_CRASH_RANK": "1", "TOY_HANG_RANK": "2"})
    trials = ledger(tmp_path)["trials"]
    by_rank = {r: [t for t in trials if t["config"]["rank"] == r] for r in (1, 2, 4)}
    assert by_rank[1] and all(t["status"] == "crashed" and "planted crash for rank 1" in t["reason"]
                              for t in by_rank[1])
    assert by_rank[2] and all(t["status"] == "timeout" and "8s time limit" in t["reason"] for t in by_rank[2])
    assert all(t["status"] == "success" for t in by_rank[4])
    assert ledger(tmp_path)["summary"]["incumbent"]["config"]["rank"] == 4
    assert "planted crash" in proc.stderr
    for t in by_rank[2]:  # the hung process group was killed
        pid = (tmp_path / "trials" / f"{t['id']:04d}" / "starts.log").read_text().split()[0]
        assert not alive(pid)
    statuses = {entry["status"] for entry in smac_runhistory(tmp_path)}
    assert {1, 2, 3} <= statuses  # SMAC's StatusType: SUCCESS, CRASHED, TIMEOUT


def test_hyperband_also_starts_brackets_above_the_smallest_budget(tmp_path):
    run_floe(["search", "--brackets", "hyperband", "--model", "tiny", "--trial-module", "tests.search_toy",
              "--ranks", "2,4,8", "--lr", "3e-3:3e-2", "--min-steps", "30", "--max-steps", "90", "--workers", "2",
              "--max-compute", "4.5", "--output", str(tmp_path)])
    trials = ledger(tmp_path)["trials"]
    assert trials and all(t["status"] == "success" for t in trials)
    first = first_budgets(trials)
    assert min(first) == 30 and max(first) > 30, first
    assert {t["budget"] for t in trials} <= {30, 90}


def test_the_compute_cap_finishes_the_bracket_it_started_instead_of_opening_another(tmp_path):
    """A cap of one bracket (3 x 30 + 90 steps = 2 full trials) with 2 workers: the free worker used to open the
    next bracket while the first rung's last trial ran, which left no room for the promotion (30,30,30,30 and no
    90-step result to choose by); the cap now reserves a started bracket's steps."""
    run_floe(["search", "--output", str(tmp_path), *SPACE, "--max-steps", "90", "--max-compute", "2"],
             env={"TOY_DELAY": "1"})
    trials = sorted(ledger(tmp_path)["trials"], key=lambda t: t["id"])
    assert [t["budget"] for t in trials] == [30, 30, 30, 90]
    best_first_rung = min(trials[:3], key=lambda t: t["cost"])
    assert trials[3]["config"] == best_first_rung["config"]
    assert ledger(tmp_path)["summary"]["incumbent"]["budget"] == 90


def test_the_same_seed_makes_the_same_choices_whatever_order_the_trials_finish_in(tmp_path):
    """Results reach SMAC in trial order, and trial k is proposed knowing trials 0 .. k - workers: delaying every
    rank-2 or rank-8 trial (so that later trials finish first) changes nothing SMAC proposes or chooses."""
    runs = {}
    for name, delay in (("fast", {}), ("rank 2 slow", {"TOY_DELAY_RANK": "2:1.5"}),
                        ("rank 8 slow", {"TOY_DELAY_RANK": "8:1.5"})):
        out = tmp_path / name.replace(" ", "_")
        run_floe(["search", "--output", str(out), *SPACE, "--max-steps", "90", "--max-compute", "6"], env=delay)
        trials = ledger(out)["trials"]
        runs[name] = ([(t["config"], t["budget"]) for t in trials], ledger(out)["summary"]["incumbent"]["config"])
    assert len(runs["fast"][0]) >= 8
    assert runs["rank 2 slow"] == runs["fast"] == runs["rank 8 slow"]


def test_the_trial_limit_also_starts_a_bracket_only_when_all_of_it_fits(tmp_path):
    """A successive-halving bracket is 4 trials (3 x 30 steps, 90); --max-trials 6 must not start a second one, which
    would stop after two of its 30-step trials and so count for nothing."""
    run_floe(["search", "--output", str(tmp_path), *SPACE, "--brackets", "sh", "--max-steps", "90",
              "--max-compute", "10", "--max-trials", "6"])
    trials = sorted(ledger(tmp_path)["trials"], key=lambda t: t["id"])
    assert [t["budget"] for t in trials] == [30, 30, 30, 90]


def test_the_compute_cap_starts_a_hyperband_bracket_only_when_all_of_it_fits(tmp_path):
    """Hyperband's brackets over 10/30/90 steps: 9 x 10 + 3 x 30 + 90 (3 full trials), 5 x 30 + 90 (2.67), 3 x 90 (3).
    A cap of 5 full trials holds the first and not the second: the second used to start (one 90-step trial fit) and
    four of its 30-step trials ran with no room left for a promotion. A cap of 5.67 holds the first two."""
    common = ["search", "--brackets", "hyperband", *SPACE, "--min-steps", "10", "--max-steps", "90"]
    for cap, rungs in (("5", {10: 9, 30: 3, 90: 1}), ("5.67", {10: 9, 30: 3 + 5, 90: 2})):
        out = tmp_path / cap
        run_floe([*common, "--max-compute", cap, "--output", str(out)], env={"TOY_DELAY": "0.3"})
        trials = ledger(out)["trials"]
        assert all(t["status"] == "success" for t in trials)
        assert {b: sum(t["budget"] == b for t in trials) for b in (10, 30, 90)} == rungs, cap
        assert ledger(out)["summary"]["incumbent"]["budget"] == 90


def test_a_candidates_margin_carries_its_paired_standard_error_over_the_validation_examples(tmp_path):
    """Each candidate's best top-budget trial is compared with the incumbent example by example: a margin well
    above the noise of the validation set is resolved, one within two standard errors is flagged."""
    from floe_dist.recipe import SearchSection
    from floe_dist.search.ledger import Ledger, Trial
    from floe_dist.search.report import candidate_costs, candidate_report, unresolved

    def trial(i: int, name: str, costs: list[float], budget: int = 24) -> Trial:
        return Trial(i, {"allocation": name, "rank": 4, "lr": 1e-3}, budget, 0, status="success",
                     cost=sum(costs) / len(costs), metrics={"example_costs": costs})

    base, noise = [0.2, 0.9, 0.4, 0.1, 0.6, 0.3], [0.5, -0.5, 0.5, -0.5, 0.5, -0.4]
    ledger = Ledger(tmp_path / "search.json", SearchSection())
    ledger.trials = [trial(0, "floe", base), trial(1, "uniform", [c + 0.1 for c in base]),  # 0.1 behind everywhere
                     trial(2, "random", [c + d for c, d in zip(base, noise)]),  # 0.0167 behind on average, noisily
                     trial(3, "random", [0.0] * 6, budget=8)]  # a lower budget: not compared
    names = ["floe", "uniform", "random"]
    report = candidate_report(ledger, names)
    assert report["floe"]["margin"] == 0 and report["floe"]["margin_se"] == 0
    assert report["uniform"]["margin"] == pytest.approx(0.1) and report["uniform"]["margin_se"] < 1e-12
    assert report["random"]["margin"] == pytest.approx(sum(noise) / 6)
    assert report["random"]["margin_se"] == pytest.approx(statistics.stdev(noise) / math.sqrt(6))
    assert unresolved(report, "floe") == ["random"]
    assert candidate_costs(report)[2] == f"random {sum(base) / 6 + sum(noise) / 6:.4f} (+0.0167 ± 0.2167, 2 trials)"
    ledger.trials[1].metrics = {}  # a trial program that reports no per-example costs: no error bar, no flag
    report = candidate_report(ledger, names)
    assert report["uniform"]["margin_se"] is None and unresolved(report, "floe") == ["random"]


def test_bo_mode_with_the_error_objective_costs_one_minus_validation_accuracy(tmp_path):
    """--mode bo trains every trial at --max-steps; --objective error scores a real LM trial by 1 - accuracy."""
    run_floe(["search", "--mode", "bo", "--objective", "error", "--model", "tiny", "--task", "sst2", "--ranks", "2,4",
              "--lr", "1e-3:1e-2", "--max-steps", "2", "--micro-batch", "2", "--val-limit", "8",
              "--initial-configs", "2", "--max-trials", "2", "--workers", "1", "--output", str(tmp_path)])
    search = ledger(tmp_path)  # one warm worker runs both trials (parallel trials: the toy searches above)
    trials = search["trials"]
    assert len(trials) == 2 and all(t["status"] == "success" and t["budget"] == 2 for t in trials)
    for t in trials:
        assert t["metrics"]["val_examples"] == 8
        assert t["cost"] == pytest.approx(1 - t["metrics"]["val_accuracy"]) != t["metrics"]["val_loss"]
        errors = t["metrics"]["example_costs"]  # per validation example, in order: 0/1
        assert len(errors) == 8 and set(errors) <= {0.0, 1.0} and sum(errors) / 8 == pytest.approx(t["cost"])
    assert search["summary"]["incumbent"]["cost"] == min(t["cost"] for t in trials)


@pytest.mark.parametrize("launcher,ranks", [("torchrun", "2,4"), ("deepspeed", "4")])
def test_language_model_trials_run_as_two_rank_zero3_groups(tmp_path, launcher, ranks):
    run_floe(["search", "--mode", "grid", "--model", "tiny", "--task", "sst2", "--ranks", ranks, "--lr", "1e-3",
              "--max-steps", "2", "--micro-batch", "2", "--val-limit", "8", "--trial-nproc", "2", "--zero", "3",
              "--trial-launcher", launcher, "--workers", "1", "--output", str(tmp_path)])
    trials = ledger(tmp_path)["trials"]
    assert [t["status"] for t in trials] == ["success"] * len(ranks.split(","))
    for t in trials:
        line = tmp_path / "lines" / f"{t['id']:04d}"  # the grid tries each configuration once: its own line
        assert json.loads((line / "train" / "train.json").read_text())["world_size"] == 2
        assert json.loads((line / "train" / "train_args.json").read_text())["train.split"] == "fit"
        assert t["metrics"]["val_examples"] == 8 and t["cost"] == t["metrics"]["val_loss"] > 0
        losses = t["metrics"]["example_costs"]  # scored on the partitioned path's whole-backbone export
        assert len(losses) == 8 and sum(losses) / 8 == pytest.approx(t["cost"], abs=1e-5)
        ranks = {r for mods in Allocation.load(line / "allocation.json").layers.values()
                 for m in mods.values() for r in m.ranks}
        assert ranks == {t["config"]["rank"]}  # every expert of every module at the trial's rank
    best = min(trials, key=lambda t: t["cost"])
    assert Allocation.load(tmp_path / "allocation.json").meta["search"]["config"] == best["config"]


def test_bad_search_arguments_and_changed_settings_fail_clearly(tmp_path):
    proc = run_here(["search", "--model", "tiny", "--ranks", "0,x", "--lr", "5:1", "--output", str(tmp_path / "s")])
    assert proc.returncode == 2 and not (tmp_path / "s").exists()
    for message in ("search.ranks must be comma-separated integers", "search.lr needs 0 < LO <= HI"):
        assert message in proc.stderr  # every bad value at once
    for flag, value, choices in (("--mode", "bayes", "'smac', 'bo', 'random', 'grid'"),
                                 ("--pending", "best", "'none', 'worst'"), ("--model-data", "all", "'budget', 'pooled'")):
        proc = run_here(["search", "--model", "tiny", flag, value, "--output", str(tmp_path / "s")])
        assert proc.returncode == 2 and f"{flag[2:].replace('-', '_')}: expected one of {choices}, got {value}" \
            in proc.stderr
        assert not (tmp_path / "s").exists()
    args = ["search", "--mode", "grid", "--output", str(tmp_path / "g"), *SPACE, "--ranks", "4",
            "--lr", "1e-2", "--max-steps", "30"]
    run_floe(args)
    proc = run_floe([*args[:-1], "60"], check=False)
    assert proc.returncode == 2 and "other settings: search.max_steps (30 -> 60)" in proc.stderr


def test_killing_the_search_takes_down_the_ranks_of_group_trials(tmp_path):
    """torchrun starts ranks in sessions of their own: they must still die with the search."""
    args = ["search", "--mode", "grid", "--output", str(tmp_path), *SPACE, "--ranks", "4", "--lr", "1e-2",
            "--trial-nproc", "2", "--workers", "1"]
    proc = subprocess.Popen(floe_command(args), cwd=REPO, env={**clean_env(1), "TOY_DELAY": "60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    starts = tmp_path / "trials" / "0000" / "starts.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (starts.is_file() and len(starts.read_text().split()) == 2):
        time.sleep(0.2)
    ranks = starts.read_text().split()
    assert len(ranks) == 2 and all(alive(pid) for pid in ranks)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(pid) for pid in ranks):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in ranks)
