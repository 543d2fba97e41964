"""The floe-dist command line: help, argument errors, and the tiny campaign end to end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace

import yaml

from floe_dist.files import LOCK_NAME, exclusive
from floe_dist.recipe import load_recipe, read_recipe
from tests.conftest import REPO, clean_env, floe_command, run_floe, run_here


def test_bad_train_arguments_fail_before_any_work(tmp_path):
    proc = run_here(["train", "--model", "tiny", "--steps", "0", "--allocation", str(tmp_path / "x.json"),
                     "--output", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert "train.steps must be >= 1" in proc.stderr and "x.json: file not found" in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = run_here(["train", "--model", "tiny", "--zero", str(tmp_path / "nope.json"),
                     "--output", str(tmp_path / "o")])
    assert proc.returncode == 2 and "DeepSpeed config not found" in proc.stderr


def test_a_bad_searched_allocation_fails_the_campaign_before_any_stage(tmp_path):
    """The default allocates uniformly, so Fisher candidates (floe:K) have no scores to come from: refused up
    front with every bad item named, not after the zero-shot evaluation."""
    out = tmp_path / "c"
    for value, message in (("floe:4", "'floe:4' needs Fisher scores: allocate.method floe"),
                           ("uniform:3", "'uniform:3' is not uniform, random, random:K, floe:K or NAME=FILE")):
        proc = run_here(["campaign", "--config", "tiny", "--allocate.method", "uniform", "--search.allocations",
                         value, "--output", str(out)])
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()


def test_a_failed_campaign_stage_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "floe-dist/allocation@1", "target_modules": ["q_proj"], "layers": {}}))
    campaign = ["campaign", "--config", "tiny", "--parallel.nproc", "1", "--output", str(tmp_path / "c"),
                "--allocate.file", str(bad)]
    proc = run_floe(campaign, check=False)  # the search stage reads the allocation first
    assert proc.returncode == 2 and "empty allocation" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c" / "search" / "trials").exists()
    proc = run_floe([*campaign, "--search.enabled", "false"], check=False)  # then the train stage (its own process)
    assert proc.returncode == 2
    assert "train stage failed" in proc.stderr and "empty allocation" in proc.stderr
    assert "Traceback" not in proc.stderr.split("train stage failed")[-1]


def test_a_killed_campaign_takes_its_running_stage_with_it(tmp_path):
    """kill -9 of the campaign alone: its stage (one rank scoring layers, here with a warm-up of 100,000 steps, forked
    from the campaign's zygote) gets SIGTERM from the kernel when the zygote goes with the campaign
    (``die_with_parent``, both) and lets go of its folder, so a rerun can resume. A group of ranks under torchrun
    dies the same way: tests/floe_dist/stages/test_train.py kills one."""
    out = tmp_path / "c"
    lock = out / "allocate" / LOCK_NAME
    with open(tmp_path / "campaign.log", "w") as log:
        campaign = subprocess.Popen(floe_command(["campaign", "--config", "tiny", "--parallel.nproc", "1",
                                                  "--output", str(out), "--score.warmup_steps", "100000"]),
                                    cwd=REPO, env=clean_env(1), stdout=log, stderr=subprocess.STDOUT)
    holder = None
    try:
        deadline = time.monotonic() + 300
        while not (lock.is_file() and lock.read_text().startswith("pid ")):  # the score stage holds its folder
            assert campaign.poll() is None and time.monotonic() < deadline, (tmp_path / "campaign.log").read_text()
            time.sleep(0.5)
        holder = int(lock.read_text().split()[1])
        campaign.send_signal(signal.SIGKILL)
        campaign.wait()
        with exclusive(out / "allocate", wait=30):  # refused after 30 s if the stage lived on
            pass
    finally:
        campaign.kill()
        if holder and lock.is_file() and lock.read_text().startswith(f"pid {holder} "):
            os.kill(holder, signal.SIGKILL)  # only when the stage outlived its campaign: the failure case


USER_RECIPE = """\
# written by a user: their own model choice and multiple-choice JSONL task, short stages
model: {{name: tiny}}
data: {{task: {task}}}
allocate: {{method: floe}}
score: {{warmup_steps: 2, proxy_examples: 32, samples: 32, micro_batch: 2}}
search: {{ranks: "2,4", lr: "1e-3:1e-2", min_steps: 1, max_steps: 3, max_compute: 2.0, val_limit: 16, micro_batch: 2,
          allocations: "uniform,random"}}
train: {{steps: 4, micro_batch: 2}}
evaluate: {{limit: 24, ranks: all}}
parallel: {{nproc: 2, zero: "3"}}
"""


def user_task(path):
    rows = [{"prompt": f"Is {n} an even number? Answer:", "choices": [" yes", " no"], "label": n % 2}
            for n in range(120)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_users_recipe_runs_end_to_end_resumes_and_names_changed_keys(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(USER_RECIPE.format(task=user_task(tmp_path / "even.jsonl")))
    out = tmp_path / "campaign"
    proc = run_floe(["campaign", "--config", str(recipe), "--output", str(out)])
    summary = json.loads((out / "campaign.json").read_text())
    assert summary["ranks"] == 2 and summary["trainable_parameters"] > 0 and summary["task"].endswith("even.jsonl")
    assert 0.0 <= summary["zero_shot_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert set(summary["stage_seconds"]) == {"prepare", "zero_shot", "allocate", "search", "train", "final_eval"}
    fisher = json.loads((out / "allocate" / "fisher.json").read_text())
    assert fisher["world_size"] == 2 and len(fisher["selected_layers"]) == 1  # 25% of 4 layers
    search = json.loads((out / "search" / "search.json").read_text())["summary"]
    assert set(search["candidates"]) == {"floe", "uniform", "random-1"}  # the search chose the allocation too
    assert summary["searched_allocation"] == search["allocation"] and "searched allocations" in proc.stdout
    assert "[campaign] train: 2 rank(s) forked from the campaign's zygote" in proc.stdout  # no torchrun, no imports
    winner = json.loads((out / "search" / "candidates" / f"{search['allocation']}.json").read_text())
    candidates = {p.stem: json.loads(p.read_text()) for p in (out / "allocate" / "candidates").glob("*.json")}
    assert sorted(candidates) == ["random-1", "uniform"] and len(candidates["uniform"]["layers"]) == 4
    trained = json.loads((out / "train" / "allocation.json").read_text())
    if search["allocation"] == "floe":
        assert sorted(map(int, trained["layers"])) == fisher["selected_layers"]  # score chose where,
    assert sorted(trained["layers"]) == sorted(winner["layers"])  # the search chose among where-s,
    assert {r for mods in trained["layers"].values() for m in mods.values() for r in m["ranks"]} == {search["rank"]}
    train_args = json.loads((out / "train" / "train_args.json").read_text())
    assert train_args["train.lr"] == search["lr"] == summary["lr"] and train_args["train.steps"] == 4
    for evaluation in ("zero_shot", "final_eval"):  # on the 2 ranks, each holding half the backbone (ZeRO-3)
        scored = json.loads((out / f"{evaluation}.json").read_text())
        assert (scored["examples"], scored["ranks"], scored["partitioned"]) == (24, 2, True)
    assert "[campaign] evaluate: 2 rank(s) forked from the campaign's zygote" in proc.stdout
    assert "final accuracy" in proc.stdout
    assert (out / "train" / "adapter" / "adapter_model.safetensors").is_file()
    user = load_recipe(str(recipe))
    for folder in (out, out / "allocate"):
        assert read_recipe(folder / "recipe.yaml") == user
    # each later stage's folder holds the recipe it ran: the user's, plus what the campaign decided before it
    searched, trained_recipe = (read_recipe(out / f / "recipe.yaml") for f in ("search", "train"))
    assert {c.split("=")[0] for c in searched.search.candidates.split(",")} == {"floe", "uniform", "random-1"}
    assert replace(searched, search=user.search, allocate=user.allocate) == user
    assert trained_recipe.allocate.file == str(out / "search" / "allocation.json")
    assert trained_recipe.train.lr == search["lr"]
    assert replace(trained_recipe, allocate=user.allocate, train=user.train) == user
    again = run_floe(["campaign", "--config", str(recipe), "--output", str(out)])
    assert again.stdout.count("done earlier") == 6
    changed = run_here(["campaign", "--config", str(recipe), "--output", str(out), "--train.steps", "5"])
    assert changed.returncode == 2 and "finished stages (train, final_eval)" in changed.stderr
    assert "train.steps (4 -> 5)" in changed.stderr


def cli(*argv: str) -> tuple[int, str, str]:
    proc = run_here(list(argv))
    return proc.returncode, proc.stdout, proc.stderr


def test_help_says_what_each_flag_is_and_version_prints_the_package_version():
    from importlib.metadata import version

    assert cli("--version")[1].strip() == f"floe-dist {version('floe-dist')}"
    train = cli("train", "--help")[1]
    assert "--steps                      --train.steps" in train and "--lr                         --train.lr" in train
    assert "--model CONFIG" not in train and "--adapter CONFIG" not in train  # no flag means two things
    assert "--lr                         --search.lr" in cli("search", "--help")[1]
    slurm = cli("slurm", "--help")[1]
    assert "<class" not in slurm and "slurm: an sbatch script" in slurm and "{render,submit,hostfile}" in slurm
    code, _, err = cli("slurm", "--action", "publish")
    assert code == 2 and "action: expected one of 'render', 'submit', 'hostfile', got publish" in err


def test_the_earlier_spellings_still_work_and_name_their_new_one():
    code, out, err = cli("campaign", "--preset", "tiny", "--nproc", "1", "--steps", "3", "--no-search",
                         "--print_config")
    printed = yaml.safe_load(out)
    assert code == 0 and printed["model"]["name"] == "tiny" and printed["parallel"]["nproc"] == 1
    assert printed["train"]["steps"] == 3 and printed["search"]["enabled"] is False
    for old, new in (("preset", "config"), ("nproc", "parallel.nproc"), ("steps", "train.steps"),
                     ("no-search", "search.enabled false")):
        assert f"--{old} is now --{new}" in err
    assert yaml.safe_load(cli("campaign", "--preset", "default", "--print_config")[1])["model"]["name"] \
        == "smollm2-135m"


def test_print_config_prints_the_recipe_then_every_problem_it_has(tmp_path):
    (tmp_path / "ok.yaml").write_text("parallel: {zero: 3}\nadapter: {targets: [q_proj, v_proj]}\n"
                                      "search: {ranks: [4, 8, 16]}\ndata: {columns: {instruction: question}}\n")
    code, out, err = cli("campaign", "--config", str(tmp_path / "ok.yaml"), "--print_config")
    assert code == 0 and yaml.safe_load(out)["search"]["ranks"] == "4,8,16" and "error" not in err
    (tmp_path / "broken.yaml").write_text("model: {max_length: 1}\ndata: {sources: [{weight: 2}]}\n")
    for command in ("campaign", "train"):
        code, out, err = cli(command, "--config", str(tmp_path / "broken.yaml"), "--print_config")
        assert code == 2 and "max_length: 1" in out  # printed first, then judged
        assert "data.sources[0]: needs a task" in err and "model.max_length must be >= 2" in err


def test_a_stage_alone_starts_the_recipes_ranks_and_a_launcher_of_another_size_is_refused(tmp_path):
    out = tmp_path / "t"
    proc = run_floe(["train", "--config", "tiny", "--train.steps", "1", "--output", str(out)])  # tiny: nproc 2
    assert "starting parallel.nproc = 2 ranks" in proc.stdout
    assert json.loads((out / "train.json").read_text())["world_size"] == 2
    proc = run_floe(["train", "--config", "tiny", "--parallel.nproc", "3", "--train.steps", "1", "--output",
                     str(tmp_path / "u")], nproc=2, check=False)
    assert proc.returncode != 0 and "parallel.nproc x parallel.nodes = 3 x 1 ranks, but the launcher started 2" \
        in proc.stderr and not (tmp_path / "u" / "train_args.json").exists()
    proc = run_floe(["train", "--config", "tiny", "--parallel.nodes", "2", "--output", str(tmp_path / "v")],
                    check=False)
    assert proc.returncode == 2 and "start this stage on the nodes with srun or deepspeed" in proc.stderr


def test_inputs_that_cannot_train_are_refused_before_anything_is_written(tmp_path):
    for flags in (["--max-length", "0"], ["--pack", "--max-length", "1"]):
        proc = run_here(["train", "--model", "tiny", *flags, "--output", str(tmp_path / "o")])
        assert proc.returncode == 2 and "model.max_length must be >= 2" in proc.stderr and not (tmp_path / "o").exists()
