"""Training under DeepSpeed: 1 rank == 2 ranks (ZeRO-3), exact resume after kill -9, exports that load back."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, RESUMABLE_RUN, clean_env, floe_command, read_metrics, recipe_for, run_floe, run_python

# The runs these tests compare, with the cosine schedule: the layout-change test's bound (resumed no further from
# the 2-rank run than a 1-rank run from the start) was set on it; under wsd's higher late rate both gaps are
# rounding noise of one size (2.3e-5 against 1.5e-5 measured)
MOE = ["--experts", "2", "--router", "topk", "--top-k", "1", "--rank", "4", "--targets", "q_proj,v_proj,up_proj",
       "--dropout", "0", "--train.schedule", "cosine"]
PROBE = "tests/floe_dist/logits_probe.py"


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """The same 8 steps on 1 rank (micro-batch 4) and on 2 ZeRO-3 ranks (micro-batch 2 each), every second step
    checkpointed and kept.

    The balance loss is off: its routing statistics are global (all-reduced over ranks), but one rank of
    micro-batch 4 pads its batch differently from two ranks of micro-batch 2, and the padded positions
    are routed too, so it is the one term that differs between the two splits.
    """
    root = tmp_path_factory.mktemp("zero3")
    common = ["train", "--model", "tiny", "--steps", "8", "--zero", "3", "--checkpoint-every", "2",
              "--keep-checkpoints", "4", "--balance-coef", "0", *MOE]
    run_floe([*common, "--micro-batch", "4", "--output", str(root / "one")])
    run_floe([*common, "--micro-batch", "2", "--output", str(root / "two")], nproc=2)
    return root / "one", root / "two"


def test_two_rank_zero3_matches_one_rank(zero3_runs):
    one, two = (_losses(r) for r in zero3_runs)
    assert len(one) == len(two) == 8
    assert abs(one[0] - two[0]) <= 1e-6 * abs(one[0])  # first step: same samples, same weights
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert json.loads((zero3_runs[1] / "train.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("stage", ["2", "0"])
def test_two_rank_zero2_and_zero0_match_one_rank_zero3(zero3_runs, tmp_path, stage):
    """Loss and logged gradient norm (fp32 ZeRO-0 clips without recording it: train computes it)."""
    out = tmp_path / f"zero{stage}"
    run_floe(["train", "--model", "tiny", "--steps", "8", "--zero", stage, "--micro-batch", "2", "--balance-coef", "0",
              *MOE, "--output", str(out)], nproc=2)
    reference, run = read_metrics(zero3_runs[0]), read_metrics(out)
    for a, b in zip(reference, run):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
        assert b["grad_norm"] > 0 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]


def test_deepspeed_launcher_runs_the_same_training(zero3_runs, tmp_path):
    """`deepspeed --num_gpus 2 --module launcher.cli train ...` (it prepends --local_rank=N)."""
    from floe_dist.distributed.runtime import free_port

    args = json.loads((zero3_runs[1] / "train_args.json").read_text())
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "launcher.cli", "train", "--model", "tiny", "--steps", "8", "--zero", "3", "--micro-batch", "2",
           "--checkpoint-every", "2", "--balance-coef", "0", *MOE, "--output", str(out)]
    assert args["train.micro_batch"] == 2 and args["train.steps"] == 8
    subprocess.run(cmd, cwd=REPO, env=clean_env(2), check=True, capture_output=True, timeout=600)
    for a, b in zip(_losses(zero3_runs[0]), _losses(out)):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert json.loads((out / "train.json").read_text())["world_size"] == 2


def test_tensorboard_has_loss_lr_balance_and_expert_load(zero3_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(zero3_runs[1] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/balance", "train/ce"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("expert_load/layer_00/expert_0")] == [1, 8]  # the first and the last step


def _probe_logits(model: str, adapter: Path | None, quant: str, out: Path) -> torch.Tensor:
    """Logits of a fixed batch, computed in a fresh Python process."""
    proc = run_python([str(PROBE), model, str(adapter or "-"), quant, str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def _reference_model(run_dir: Path, quant: str) -> torch.nn.Module:
    """The backbone with adapter weights consolidated from the last checkpoint by DeepSpeed's zero_to_fp32."""
    from floe_dist.allocation import Allocation
    from floe_dist.modeling.backbone import load_backbone, resolve_model
    from floe_dist.modeling.inject import inject_adapters, lora_state_dict
    from floe_dist.stages.export import consolidated_lora_state

    ckpt = run_dir / "checkpoints"
    state = consolidated_lora_state(ckpt, (ckpt / "latest").read_text().strip())
    model = load_backbone(resolve_model("tiny"), quant)
    inject_adapters(model, Allocation.load(run_dir / "allocation.json"))
    params = lora_state_dict(model)
    assert set(params) == set(state)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
    return model.eval()


def _reference_logits(run_dir: Path, quant: str) -> torch.Tensor:
    from tests.floe_dist.logits_probe import PROBE_IDS

    with torch.no_grad():
        return _reference_model(run_dir, quant)(PROBE_IDS).logits


def test_zero3_export_reloads_in_a_fresh_process(zero3_runs, tmp_path):
    run = zero3_runs[1]
    fresh = _probe_logits("tiny", run / "adapter", "none", tmp_path / "fresh.pt")
    base = _probe_logits("tiny", None, "none", tmp_path / "base.pt")
    assert (fresh - base).abs().max() > 1e-4  # the export is not an empty/zero adapter
    torch.testing.assert_close(fresh, _reference_logits(run, "none"), rtol=0, atol=1e-6)


def test_nf4_zero3_export_reloads_in_a_fresh_process(tmp_path):
    out = tmp_path / "nf4"
    run_floe(["train", "--model", "tiny", "--steps", "2", "--micro-batch", "2", "--quant", "nf4", "--zero", "3",
              "--output", str(out), *MOE], nproc=2)
    fresh = _probe_logits("tiny", out / "adapter", "nf4", tmp_path / "fresh.pt")
    base = _probe_logits("tiny", None, "nf4", tmp_path / "base.pt")
    assert (fresh - base).abs().max() > 1e-4
    torch.testing.assert_close(fresh, _reference_logits(out, "nf4"), rtol=0, atol=1e-6)
    # generate on the NF4 backbone + LoRA-MoE export writes what greedy decoding by hand does
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": t, "output": "-"}) + "\n"
                               for t in ("Review a fine film.", "Calculate 5 + 9.")))
    run_floe(["generate", "--model", "tiny", "--adapter", str(out / "adapter"), "--quant", "nf4", "--input",
              str(prompts), "--max-new-tokens", "6", "--output", str(tmp_path / "gen.jsonl")])
    written = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(written) == 2 and all(w["generation"] for w in written)
    assert [w["generation"] for w in written] == _greedy(_reference_model(out, "nf4"), [w["prompt"] for w in written])


def _greedy(model, prompts: list[str], new_tokens: int = 6) -> list[str]:
    """Greedy decoding one token at a time over the whole sequence (no KV cache, no batching)."""
    from floe_dist.modeling.backbone import load_tokenizer, resolve_model

    tokenizer, texts = load_tokenizer(resolve_model("tiny")), []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        start = len(ids)
        for _ in range(new_tokens):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tokenizer.eos_token_id:
                break
        texts.append(tokenizer.decode(ids[start:], skip_special_tokens=True).strip())
    return texts


def test_plain_lora_export_loads_with_peft(tmp_path):
    from peft import PeftModel

    from floe_dist.modeling.backbone import load_backbone, resolve_model
    from tests.floe_dist.logits_probe import PROBE_IDS

    out = tmp_path / "lora"
    run_floe(["train", "--model", "tiny", "--steps", "2", "--micro-batch", "2", "--rank", "4", "--zero", "3",
              "--experts", "1", "--router", "topk", "--top-k", "1", "--output", str(out)], nproc=2)
    assert (out / "adapter" / "peft" / "adapter_config.json").is_file()
    peft_model = PeftModel.from_pretrained(load_backbone(resolve_model("tiny")), str(out / "adapter" / "peft"))
    peft_model.eval()
    with torch.no_grad():
        peft_logits = peft_model(PROBE_IDS).logits
    ours = _probe_logits("tiny", out / "adapter", "none", tmp_path / "ours.pt")
    torch.testing.assert_close(peft_logits, ours, rtol=0, atol=1e-6)


def test_kill_9_then_resume_gives_the_uninterrupted_loss_curve(uninterrupted_run, tmp_path):
    common = ["train", *RESUMABLE_RUN]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(floe_command([*common, "--output", str(killed)], nproc=2), cwd=REPO, env=clean_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").is_file() and len(read_metrics(killed)) >= 6:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun; its ranks (own sessions) die with it: die_with_parent
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "train.json").exists()
    assert 6 <= len(read_metrics(killed)) < 24

    time.sleep(1)  # a rank that outlived its launcher would write on here
    written = len(read_metrics(killed))
    resumed = run_floe([*common, "--output", str(killed)], nproc=2)
    step = int(re.search(r"resumed from \S+ at step (\d+)", resumed.stdout)[1])
    assert step <= written < 24  # from the killed run's last checkpoint: its ranks died with their launcher
    straight, again = _losses(uninterrupted_run), _losses(killed)
    assert len(again) == 24
    for a, b in zip(straight, again):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from floe_dist import trainer
    from floe_dist.modeling.answer_lm import AnswerLM
    from floe_dist.stages import train

    class NanAtFourthForward(AnswerLM):
        calls = 0

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            NanAtFourthForward.calls += 1
            if NanAtFourthForward.calls == 4:
                out["loss"] = out["loss"] * float("nan")
            return out

    monkeypatch.setattr(trainer, "AnswerLM", NanAtFourthForward)
    out = tmp_path / "nan"
    recipe = recipe_for("train", model="tiny", steps=6, micro_batch=2, checkpoint_every=2, zero="3")
    with pytest.raises(FloatingPointError, match="loss is not finite at step 3"):
        train.run(recipe, str(out))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"  # last good one kept
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert not (out / "adapter").exists()


def test_resuming_with_other_settings_is_refused(zero3_runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(zero3_runs[0], run)
    proc = run_floe(["train", "--model", "tiny", "--steps", "4", "--zero", "3", "--micro-batch", "4", "--rank", "8",
                     "--output", str(run)], check=False)
    assert proc.returncode == 2 and "checkpoints of a run made with other settings: " in proc.stderr
    assert "rank (4 -> 8)" in proc.stderr


def test_a_two_rank_checkpoint_resumes_on_one_rank_with_the_same_global_batch(zero3_runs, tmp_path):
    """Layout change: 2 ZeRO-3 ranks of micro-batch 2 -> 1 rank of micro-batch 4 from the step-2 checkpoint.
    The restored AdamW moments, optimizer step and learning rate are the saved ones, exactly; the six resumed
    steps, and the adapters and moments of the checkpoints they write, equal the uninterrupted 2-rank run's."""
    import shutil

    from floe_dist.distributed import portable
    from floe_dist.trainer import Trainer

    two = zero3_runs[1]
    moved = tmp_path / "moved"
    shutil.copytree(two, moved, ignore=shutil.ignore_patterns("step_[4-8]", "adapter", "train.json"))
    (moved / "checkpoints" / "latest").write_text("step_2")
    flags = ["train", "--model", "tiny", "--steps", "8", "--zero", "3", "--checkpoint-every", "2",
             "--keep-checkpoints", "4", "--balance-coef", "0", *MOE, "--output", str(moved)]
    refused = run_floe([*flags, "--micro-batch", "2"], check=False)  # global batch 2 instead of 4
    assert refused.returncode == 2 and "global batch of 4" in refused.stderr and "--micro-batch 4" in refused.stderr

    saved = portable.read(moved / "checkpoints" / "step_2")
    recipe = recipe_for("train", model="tiny", steps=8, zero="3", checkpoint_every=2, keep_checkpoints=4,
                        balance_coef=0.0, micro_batch=4, experts=2, router="topk", top_k=1, rank=4,
                        targets="q_proj,v_proj,up_proj", dropout=0.0, train__schedule="cosine")
    restored = Trainer(recipe, str(moved))
    assert restored.resume() == 2
    trainable = [(n, p) for n, p in restored.engine.module.named_parameters() if p.requires_grad]
    assert trainable
    for name, param in trainable:
        for key in portable.MOMENTS:
            expected = saved["moments"][f"{key}/{name.removeprefix('lm.')}"]
            if "lora_router" not in name:  # top-1 gates are 1: only the experts have moved (balance off)
                assert expected.abs().max() > 0, (key, name)  # two AdamW steps: not a fresh optimizer's zeros
            torch.testing.assert_close(portable._full_moment(restored.engine, param, key), expected, rtol=0, atol=0)
    assert portable._optimizer_step(portable._inner(restored.engine)) == saved["optimizer_step"] == 2
    assert restored.engine.get_lr()[0] == read_metrics(two)[2]["lr"]  # the rate step 3 used
    del restored

    proc = run_floe([*flags, "--micro-batch", "4"])
    assert "at step 2 on another layout: 2 -> 1 ranks" in proc.stdout
    original, again = read_metrics(two), read_metrics(moved)
    assert [m["step"] for m in again] == list(range(1, 9))
    for a, b in zip(original[2:], again[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
        assert a["lr"] == b["lr"]
    for tag in ("step_4", "step_8"):  # adapters and moments carried through more steps stay the 2-rank run's
        x, y = portable.read(two / "checkpoints" / tag), portable.read(moved / "checkpoints" / tag)
        assert x["optimizer_step"] == y["optimizer_step"] == int(tag[5:])
        for part in ("weights", "moments"):
            assert set(x[part]) == set(y[part])
            for key in x[part]:
                scale = x[part][key].abs().max()  # < 1e-10: a top-1 router's rounding noise (it gets no gradient)
                assert scale < 1e-10 or (y[part][key] - x[part][key]).abs().max() <= 2e-3 * scale, (tag, key)
    from safetensors.torch import load_file

    a, b, c = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (two, moved, zero3_runs[0]))
    gap = lambda x, y: max((x[k] - y[k]).abs().max().item() for k in x)
    assert gap(a, b) <= gap(a, c)  # no further from the 2-rank run than a 1-rank run from the start is


def test_export_command_rebuilds_the_adapter_from_a_checkpoint(zero3_runs, tmp_path):
    run = zero3_runs[0]
    run_floe(["export", "--run", str(run), "--output", str(tmp_path / "again")])
    from safetensors.torch import load_file

    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    meta = [json.loads((d / "export.json").read_text()) for d in (run / "adapter", tmp_path / "again")]
    for key in ("base_model", "quant", "task"):  # the export names what it was trained on, as the trainer's does
        assert meta[0][key] == meta[1][key] and meta[1][key], key
    proc = run_floe(["export", "--run", str(run), "--merged", str(tmp_path / "merged")], check=False)
    assert proc.returncode == 2 and "LoRA-MoE adapter" in proc.stderr and "cannot be merged" in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_gradient_checkpointing_gives_the_same_curve(tmp_path):
    common = ["train", "--model", "tiny", "--steps", "3", "--micro-batch", "2", "--zero", "0", "--dropout", "0",
              *MOE[:-2]]
    run_floe([*common, "--output", str(tmp_path / "plain")])
    run_floe([*common, "--output", str(tmp_path / "ckpt"), "--gradient-checkpointing"])
    for a, b in zip(_losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")):
        assert abs(a - b) <= 1e-6 * abs(a)


def test_optimizer_is_torch_adamw_fused_on_gpu_and_cpu_adam_under_gpu_offload(monkeypatch, tmp_path):
    """No nvcc JIT build at the first step: torch's AdamW everywhere (its fused kernel on CUDA),
    except an optimizer offloaded from a GPU, which keeps DeepSpeedCPUAdam."""
    from floe_dist.distributed import engine as ds

    def optimizer(stage):
        return ds.build_config(stage, micro_batch=1, accumulation=1, world_size=1, lr=1e-3,
                               weight_decay=0.0)["optimizer"]["params"]

    assert optimizer(3)["torch_adam"] is True and "fused" not in optimizer(3)  # CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert optimizer(3)["torch_adam"] is True and optimizer(3)["fused"] is True
    offload = json.loads((ds.ZERO_CONFIGS / "zero3.json").read_text())
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "offload.json").write_text(json.dumps(offload))
    params = optimizer(str(tmp_path / "offload.json"))
    assert "torch_adam" not in params and "fused" not in params


def test_fused_router_trains_as_the_eager_one_on_two_zero3_ranks(tmp_path):
    """FLOE_DIST_FUSED_ROUTER=1 turns the compiled router on (opt-in, CPU here): under ZeRO-3 on two
    ranks, with gradient checkpointing recomputing it and the balance loss's stats all-reduced between
    its two compiled parts, the losses and gradient norms are the eager router's."""
    common = ["train", "--model", "tiny", "--steps", "3", "--zero", "3", "--micro-batch", "2", "--experts", "4",
              "--router", "topk", "--top-k", "2", "--rank", "4", "--targets", "q_proj,v_proj", "--dropout", "0",
              "--gradient-checkpointing"]
    runs = {}
    for fused in ("0", "1"):
        run_floe([*common, "--output", str(tmp_path / fused)], nproc=2, env={"FLOE_DIST_FUSED_ROUTER": fused})
        runs[fused] = read_metrics(tmp_path / fused)
        router = json.loads((tmp_path / fused / "train.json").read_text())["router"]
        assert router == ("compiled" if fused == "1" else "eager")
    assert len(runs["0"]) == len(runs["1"]) == 3 and runs["0"][0]["balance"] > 0
    for eager, fused in zip(runs["0"], runs["1"]):
        for key in ("loss", "balance", "grad_norm"):
            assert abs(fused[key] - eager[key]) <= 1e-5 * abs(eager[key])


@pytest.mark.parametrize("schedule, measured, seconds, known", [
    ("wsd", 1, 0.5, True),  # wsd measures on until its cooldown is due: it may try from the first step
    ("cosine", 6, 30.0, False),  # still in its warm-up (8 steps)
    ("cosine", 9, 5.0, False),  # past it, but less than a tenth of its 100 s measured
    ("cosine", 9, 10.0, True),
])
def test_a_time_limited_cosine_run_measures_past_its_warmup_and_a_tenth_of_its_time(schedule, measured, seconds,
                                                                                   known):
    """A cosine run's steps after its warm-up depend on its length, so it is set once: from enough of the run that
    uneven batches average out (five steps of chat conversations set one 51 s short of its 240 s)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from floe_dist.recipe import load_recipe
    from floe_dist.trainer import Trainer

    recipe = load_recipe("tiny", [])
    recipe = replace(recipe, train=replace(recipe.train, schedule=schedule, warmup_steps=8, time_limit=100.0))
    assert Trainer.speed_known(SimpleNamespace(recipe=recipe), measured, seconds) is known


@pytest.mark.parametrize("before, after", [(0.02, 0.06), (0.06, 0.0)])  # slower, then faster once set
def test_a_time_limited_run_moves_its_end_when_its_steps_slow_down_or_speed_up(tmp_path, monkeypatch, before, after):
    """A wsd run sets its length from its speed when its cooldown is due; steps that then slow down (a machine
    that got busier overran a 290 s run by 5-9 s) make it end sooner, steps that speed up (900 s chat campaigns ended
    17-61 s early) later. Either way its rate goes on from the step it moved at and keeps falling at every step, down
    to the run's last; a resume rebuilds the same rates from steps.json."""
    from floe_dist import trainer as trainer_module
    from floe_dist.trainer import STEPS_FILE, Trainer

    monkeypatch.setattr(trainer_module, "RECHECK_EVERY", 2)
    recipe = recipe_for("train", model="tiny", steps=8, zero="0", micro_batch=2, checkpoint_every=0,
                        train__time_limit=4.0, train__warmup_steps=1, train__report_to="none")
    trainer = Trainer(recipe, str(tmp_path))
    step = trainer.step

    def paced(i):
        time.sleep(before if trainer.fixed_steps is None else after)
        return step(i)

    trainer.step = paced
    trainer.t0 = time.time()  # the limit from the first step: a busy machine's setup would leave it no time
    trainer.fit()
    assert json.loads((tmp_path / "train.json").read_text())["longest_save_seconds"] > 0  # the end's save, timed
    fixed = json.loads((tmp_path / STEPS_FILE).read_text())
    moves = fixed["retimed"]
    assert moves and fixed["steps"] == moves[-1]["steps"]
    first_move = moves[0]["steps"] < moves[0]["from"] if after > before else moves[0]["steps"] > moves[0]["from"]
    assert first_move and all(a["steps"] == b["from"] for a, b in zip(moves, moves[1:]))
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, fixed["steps"] + 1))
    lrs = [m["lr"] for m in metrics]
    assert all(a > b for a, b in zip(lrs[fixed["set_at_step"] - 1:], lrs[fixed["set_at_step"]:])) and lrs[-1] > 0
    resumed, since = Trainer(recipe, str(tmp_path)).lr_factor(), fixed["set_at_step"]  # (before it: the stable rate)
    assert [recipe.train.lr * resumed(i) for i in range(since, fixed["steps"])] == pytest.approx(lrs[since:], rel=1e-6)


def test_a_run_given_the_final_evaluations_reserve_times_it_and_trains_on_in_what_it_will_not_need(tmp_path,
                                                                                                    monkeypatch):
    """Four fifths in, a time-limited run given ``train.eval_reserve`` generates a batch of training prompts as the
    final evaluation will and times it: what the reserve holds beyond that pace for the test split (x the margin)
    moves its time limit later, and its end with it, the rate still falling to the last step. On a multiple-choice
    task the setting is refused before anything is written."""
    from dataclasses import replace

    from floe_dist import trainer as trainer_module
    from floe_dist.trainer import RESERVE_MARGIN, STEPS_FILE, Trainer

    monkeypatch.setattr(trainer_module, "RECHECK_EVERY", 2)
    recipe = recipe_for("train", model="tiny", steps=8, zero="0", micro_batch=2, checkpoint_every=0,
                        data__task="arithmetic", evaluate__limit=16, evaluate__batch_size=8,
                        evaluate__max_new_tokens=4, train__time_limit=3.0, train__eval_reserve=4.0,
                        train__warmup_steps=1, train__report_to="none")
    trainer = Trainer(recipe, str(tmp_path))
    step = trainer.step

    def paced(i):
        time.sleep(0.05)
        return step(i)

    trainer.step = paced
    trainer.t0 = time.time()  # the limit from the first step: a busy machine's setup would leave it no time
    trainer.fit()
    record = json.loads((tmp_path / "train.json").read_text())["eval_reserve"]
    fixed = json.loads((tmp_path / STEPS_FILE).read_text())
    assert record["batch_examples"] == 8 and record["test_batches"] == 2  # 16 test examples, 8 a batch
    assert record["kept"] == pytest.approx(min(4.0, RESERVE_MARGIN * record["batch_seconds"] * 2))
    assert record["time_limit"] == pytest.approx(3.0 + 4.0 - record["kept"]) and record["kept"] < 4.0
    moved = [m for m in fixed.get("retimed", []) if m["at_step"] == record["at_step"]]
    assert moved and moved[-1]["steps"] > moved[-1]["from"]  # the seconds taken back: more steps, at once
    assert fixed["set_at_step"] <= record["at_step"] and record["at_step"] >= 0.8 * moved[-1]["from"]  # the end then
    lrs = [m["lr"] for m in read_metrics(tmp_path)]
    assert len(lrs) == fixed["steps"] and all(a > b for a, b in zip(lrs[fixed["set_at_step"] - 1:],
                                                                  lrs[fixed["set_at_step"]:])) and lrs[-1] > 0
    with pytest.raises(ValueError, match="train.eval_reserve times a generative final evaluation"):
        Trainer(replace(recipe, data=replace(recipe.data, task="sst2")), str(tmp_path / "choice"))
    assert not (tmp_path / "choice").exists()


def test_a_moved_end_stretches_or_squeezes_the_rest_of_the_schedule():
    """Moving a cosine run's end at step 50 (of 100) to 80, then at 60 to 130, then at its last step to 140: the rate
    at each move is the one the step had, every later step's is lower than the one before, and the curve ends where
    the first length's did."""
    from floe_dist.schedule import retimed, warmup_cosine

    base = warmup_cosine(100, 10)
    moved = retimed(base, 100, [(50, 80), (60, 130), (129, 140)])
    assert [moved(s) for s in range(51)] == [base(s) for s in range(51)]
    rates = [moved(s) for s in range(50, 140)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert moved(60) == retimed(base, 100, [(50, 80)])(60) and moved(140) == pytest.approx(base(100)) == 0.1
