"""One training run on this rank: setup -> resume -> step ... -> save -> export (``floe-dist train``).

Every rank builds the same adapters (seeded), DeepSpeed partitions them as its config says, split
experts sit beside it on expert-parallel groups, and batches are a pure function of (seed, step,
micro-step, rank), so a resumed run continues the loss curve it would have had.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from floe_dist.allocation import Allocation
from floe_dist.data import data_key, train_batch
from floe_dist.distributed import engine as ds
from floe_dist.distributed import portable
from floe_dist.distributed.expert_parallel import ExpertParallel, create_groups
from floe_dist.distributed.layout import Layout
from floe_dist.distributed.runtime import all_reduce_sum, init_distributed, main_rank_first
from floe_dist.files import write_json_atomic
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import resolve_model
from floe_dist.modeling.export import save_adapter
from floe_dist.modeling.inject import adapter_modules, inject_adapters, lora_state_dict
from floe_dist.modeling.lora_moe import compiled_router_ran
from floe_dist.recipe import Recipe, TrainSection, from_dict, marked, settings_of
from floe_dist.resources import Resources
from floe_dist.resume import guard
from floe_dist.schedule import retimed
from floe_dist.tracking import MetricsLog

SECTIONS = ("train", "adapter", "model", "data", "parallel")  # what a run's result depends on, with its allocation
# Marked on the recipe's fields (config.RESUME_KINDS): what only says how a run starts (a checkpoint's world size is
# checked against it directly), how long it runs (a wsd run's steps move only its cooldown, so a trial's prefix
# continues), and what it logs.
HOW_TO_RUN = marked("runs")
RESUME_MAY_CHANGE = marked("runs", "length", "observes")
PROBE_STEPS = 5  # the least steps a time-limited cosine run measures before it sets its length (``speed_known``)
PROBE_SHARE = 0.1  # ... and the least share of its time limit (batches of uneven lengths take uneven times)
EXPERT_LOAD_EVERY = 10  # steps between expert-load records (and the first and last): 112 scalars a step on a 30-layer
# model took 7.5 ms of TensorBoard writing, 2% of a CPU step, and a device-to-host copy per layer
STEPS_FILE = "steps.json"  # a time-limited run's length, once set: a resumed run keeps it
RECHECK_EVERY = 10  # steps between a time-limited run's checks, once its length is set, that it still ends in time
# (at its mean speed since the length was set: a span that takes in the checkpoints saved every train.checkpoint_every)
KEEP_FOR_SAVES = 0.03  # of the time left at each check of a time-limited run's length: checkpoints, the export ...
KEEP_AT_END = 0.01  # ... and at least this share of its limit, for the last checkpoint and the export after the last
# check (``closing_seconds`` in train.json is what they took)
RETIME_TOLERANCE = 0.02  # the share of its steps left by which a set length's end may miss its time limit unmoved
RESERVE_PROBE_AT = 0.8  # of its steps, where a run given train.eval_reserve times the final evaluation: a wsd run's
# cooldown starts there (decay_ratio 0.2), and its adapter writes answers as the final one will
RESERVE_MARGIN = 1.25  # what the timed batch is scaled by for the whole split: its prompts are a random draw, the final
# evaluation's are sorted longest first, and one batch's time varies with its longest answer
UNSET = 10 ** 9  # a time-limited run's length before it is set: its schedule stays before the cooldown
LAYOUT_KEYS = marked("layout")  # what a portable checkpoint resumes under


def run_settings(recipe: Recipe) -> dict:
    """``train_args.json``: the settings a run's checkpoints were made with, and the allocation file it trains."""
    return {**settings_of(recipe, SECTIONS), "allocate.file": recipe.allocate.file}


def saved_train(settings: dict) -> TrainSection:
    """The train section a run's ``train_args.json`` (``run_settings``) holds."""
    return from_dict(TrainSection, {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("train.")})


def same_warmup(saved_file: Path, train: TrainSection) -> set[str]:
    """The warm-up's keys where the saved run warmed up for as many steps as ``train`` does: a budget (or a time
    limit) fixes in ``warmup_steps`` what ``warmup_ratio`` x ``train.steps`` gave a run made without one, and a
    campaign resumed with a budget continues that run."""
    if not saved_file.is_file() or saved_train(json.loads(saved_file.read_text())).warmup != train.warmup:
        return set()
    return {"train.warmup_steps", "train.warmup_ratio"}


def build_allocation(recipe: Recipe, num_layers: int) -> Allocation:
    """``allocate.file`` as it is, else the adapter section on every layer."""
    if recipe.allocate.file:
        return Allocation.load(recipe.allocate.file)
    a = recipe.adapter
    return Allocation.uniform(num_layers, a.target_list, experts=a.experts, rank=a.rank, router=a.router,
                              top_k=a.top_k, alpha=a.alpha, dropout=a.dropout, top_p=a.top_p, min_k=a.min_k)


class Trainer:
    def __init__(self, recipe: Recipe, output: str, resources: Resources | None = None):
        """Train ``recipe``'s adapter (``allocate.file``, else the adapter section on every layer) into ``output``,
        with its train, model, data and parallel settings."""
        self.t0, self.out = time.time(), Path(output)
        self.longest_save = 0.0  # seconds of this run's slowest checkpoint save (``longest_save_seconds``)
        self.length_record = {}  # what STEPS_FILE holds: the length first set, when, and each move of it since
        self.reserve_record = None  # train.eval_reserve: the final evaluation timed, and the seconds taken back
        if recipe.train.time_limit:  # the warm-up stays the one train.steps sets; the length is set by the clock
            if (self.out / STEPS_FILE).is_file():
                self.length_record = json.loads((self.out / STEPS_FILE).read_text())
            recipe = replace(recipe, train=replace(recipe.train, warmup_steps=recipe.train.warmup,
                                                   steps=self.fixed_steps or UNSET))
        self.recipe = recipe
        self.sections = recipe.train, recipe.model, recipe.data, recipe.parallel
        self.resources = resources or Resources()  # a warm search worker passes the ones it keeps
        self.ckpt_dir = self.out / "checkpoints"
        self.setup()

    def setup(self) -> None:
        """Data, backbone, adapters and the DeepSpeed engine; every bad input fails before a file is written."""
        t, m, d, p = self.sections
        info = init_distributed()
        config = ds.build_config(p.zero, micro_batch=t.micro_batch, accumulation=t.accumulation,
                                 world_size=info.world_size, lr=t.lr, weight_decay=t.weight_decay)
        self.layout = layout = Layout.current(p.ep_size, config)
        model_dir = resolve_model(m.name)
        res = self.resources
        self.tokenizer = res.tokenizer(model_dir)
        self.examples = res.examples(d, t.split, self.tokenizer)[: d.max_train_examples]
        if not self.examples:
            raise ValueError(f"data {d.name!r} has no training examples")
        prompted = any(x.generative and x.prompt for x in self.examples)
        if t.eval_reserve is not None and (layout.world_size > 1 or not prompted):
            raise ValueError("train.eval_reserve times a generative final evaluation as one process runs it: give it "
                             "to a run of one rank on prompted examples, or leave it unset")
        with main_rank_first():  # the others then read the tokenised rows rank 0 cached
            self.rows, self.truncated = res.tokenized((*data_key(d, t.split), d.max_train_examples), self.examples,
                                                      self.tokenizer, m.max_length, d.pack)
        if self.truncated and layout.is_main:
            print(f"note: {self.truncated} of {len(self.examples)} training examples are longer than max_length="
                  f"{m.max_length} tokens and are cut (what precedes their last answer, from the left)")
        self.held_out = []  # train.eval_every: the examples of the split training does not read
        if t.eval_every:
            split = "val" if t.split == "fit" else "test"
            self.held_out = res.examples(d, split, self.tokenizer)[: t.eval_examples]
            self.held_out = self.held_out[: len(self.held_out) // layout.world_size * layout.world_size]
            if not self.held_out:
                raise ValueError(f"train.eval_every: the {split} split has fewer examples than ranks")
        if d.pack and layout.is_main:
            print(f"packed {len(self.examples)} training examples into {len(self.rows)} rows of <= {m.max_length} "
                  f"tokens")
        self.lm = lm = res.backbone(model_dir, m.quant, layout, config)  # ZeRO-3: partitioned as it loads
        lm.set_attn_implementation(m.attn_implementation)
        self.allocation = build_allocation(self.recipe, lm.config.num_hidden_layers)
        torch.manual_seed(t.seed)  # identical adapter init on every rank (and on every EP layout)
        inject_adapters(lm, self.allocation)  # validates first: a bad allocation raises before anything is written
        layout.check(self.allocation)
        self.global_batch = t.micro_batch * t.accumulation * layout.world_size
        self.moved = self.layout_change()  # a checkpoint of another layout: its full adapters go in now
        if self.moved:
            portable.load_weights(lm, self.moved)
        for adapter in adapter_modules(lm).values():
            adapter.capacity_factor = t.capacity_factor
            if layout.world_size > 1:
                adapter.routing_stats_reducer = all_reduce_sum  # balance loss over the global batch
        self.experts = ExpertParallel(lm, create_groups(p.ep_size)) if p.ep_size > 1 else None
        if t.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = AnswerLM(lm, t.balance_coef)
        portable_resume = self.latest is not None and (self.ckpt_dir / self.latest / portable.FILE).is_file()
        saved = self.out / "train_args.json"
        guard(saved, run_settings(self.recipe), what="checkpoints of a run", write=False,
              may_change=RESUME_MAY_CHANGE | (LAYOUT_KEYS if portable_resume else set()) | same_warmup(saved, t),
              active=self.latest is not None)
        if layout.is_main:
            self.allocation.save(self.out / "allocation.json")  # `floe-dist export` rebuilds modules from these two
            write_json_atomic(saved, run_settings(self.recipe))
        self.engine, self.scheduler = ds.initialize(self.model, config, self.lr_factor())
        if self.experts:
            self.experts.attach(self.engine, config)

    @property
    def latest(self) -> str | None:
        return _latest_tag(self.ckpt_dir)

    def layout_change(self) -> dict | None:
        """The portable state of the latest checkpoint when it was written by another layout, else None."""
        state = portable.read(self.ckpt_dir / self.latest) if self.latest else None
        if state is None:
            return None
        layout = self.layout
        portable.check_global_batch(state, self.global_batch, layout.world_size, self.recipe.train.accumulation)
        saved = state["layout"]
        same = (saved["world_size"], saved["ep_size"], saved["zero_stage"]) == (
            layout.world_size, layout.ep_size, layout.zero_stage)
        return None if same else state

    def resume(self) -> int:
        """The step of the latest complete checkpoint (0 without one), loaded into the engine."""
        if self.latest is None:
            return 0
        if self.moved:
            portable.load_optimizer(self.engine, self.experts, self.moved)
            if self.layout.is_main:
                s, now = self.moved["layout"], self.layout
                print(f"resumed from {self.ckpt_dir / self.latest} at step {self.moved['step']} on another layout: "
                      f"{s['world_size']} -> {now.world_size} ranks, ep_size {s['ep_size']} -> {now.ep_size}, "
                      f"ZeRO-{s['zero_stage']} -> ZeRO-{now.zero_stage} (global batch {self.global_batch} kept)")
            return int(self.moved["step"])
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), load_module_strict=False)
        if self.experts:
            self.experts.load(self.ckpt_dir / self.latest)
        if self.layout.is_main:
            print(f"resumed from {self.ckpt_dir} at step {int(client['step'])}")
        return int(client["step"])

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (``accumulation`` micro-steps); the losses are means over ranks."""
        (t, *_), layout, engine = self.sections, self.layout, self.engine
        totals = torch.zeros(4, device=layout.torch_device)  # loss, ce, balance (rank means), dropped picks (sum)
        lr = engine.get_lr()[0]  # the rate this step uses
        grad_norm = None
        for micro in range(t.accumulation):
            torch.manual_seed(hash((t.seed, step, micro, layout.rank)) % 2**62)  # dropout, resumable
            batch = train_batch(self.rows, step=step, micro=micro, rank=layout.rank, world=layout.world_size,
                                micro_batch=t.micro_batch, accumulation=t.accumulation, seed=t.seed,
                                pad_id=self.tokenizer.pad_token_id)
            result = engine(**{k: v.to(layout.torch_device) for k, v in batch.items()})
            stats = all_reduce_sum(torch.stack([result["loss"], result["ce"], result["balance"],
                                                self.model.dropped_picks().to(result["loss"])]).detach())
            if not torch.isfinite(stats).all():  # every rank sees the reduced value: all stop together
                raise FloatingPointError(
                    f"loss is not finite at step {step} (micro-step {micro}); nothing was applied. "
                    f"Last good checkpoint: {_latest_tag(self.ckpt_dir) or 'none'} in {self.ckpt_dir}. "
                    f"Try a lower --lr or check the data.")
            engine.backward(result["loss"])
            if self.experts:
                self.experts.before_engine_step(engine)
            if micro == t.accumulation - 1:
                grad_norm = ds.grad_norm_before_step(engine)
            engine.step()
            if self.experts:
                self.experts.after_engine_step(engine, lr)
            totals[:3] += stats[:3] / layout.world_size / t.accumulation
            totals[3] += stats[3]
        loss, ce, balance, dropped = totals.tolist()
        return {"loss": loss, "ce": ce, "balance": balance, "lr": lr, "dropped_picks": dropped,
                "grad_norm": float(engine.get_global_grad_norm() or grad_norm or 0.0)}

    def held_out_loss(self) -> float:
        """Mean negative log-likelihood per answer token on the held-out examples (evaluation's ``answer_nll``),
        each rank an equal share, so every rank runs the same forwards, as ZeRO-3 and expert parallelism need;
        dropout off."""
        from floe_dist.evaluation import answer_nll

        layout = self.layout
        self.engine.module.eval()
        nll, tokens = answer_nll(self.engine, self.tokenizer, self.held_out[layout.rank::layout.world_size],
                                 self.recipe.train.micro_batch, self.recipe.model.max_length, layout.torch_device)
        self.engine.module.train()
        nll, tokens = all_reduce_sum(torch.tensor([nll, tokens], dtype=torch.float64,
                                                  device=layout.torch_device)).tolist()
        return nll / max(tokens, 1)

    def full_adapter(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor, full and on rank 0, in the replicated layout (collective: every rank calls it)."""
        state = ds.gather_full(lora_state_dict(self.lm))
        if self.experts:
            state.update(self.experts.gather_full())
        return state

    def save(self, step: int) -> None:
        """The layout-free state first (``portable.pt``), then DeepSpeed's checkpoint and its ``latest``."""
        weights = self.full_adapter()
        portable.save(self.ckpt_dir / f"step_{step}", step, self.engine, self.experts, self.layout,
                      self.global_batch, weights)
        self.saved = (step, weights)  # the export at this step reuses the gathered tensors
        save_checkpoint(self.engine, self.ckpt_dir, step, self.recipe.train.keep_checkpoints, self.layout.is_main,
                        self.experts)

    def steps_in_time(self, step: int, seconds_per_step: float) -> int:
        """How many steps end within train.time_limit of the run's start at this speed, keeping KEEP_FOR_SAVES of the
        time left and at least KEEP_AT_END of the limit for checkpoints and the export; rank 0's measure, on every
        rank."""
        limit = self.recipe.train.time_limit
        left = self.t0 + limit - time.time()
        steps = step + max(1, int((left - max(KEEP_FOR_SAVES * left, KEEP_AT_END * limit)) / seconds_per_step))
        return int(all_reduce_sum(torch.tensor([steps if self.layout.is_main else 0],
                                               device=self.layout.torch_device)).item())

    def fit_to_time(self, step: int, seconds_per_step: float) -> None:
        """A time-limited run's length from its measured speed: as many steps as end within train.time_limit of its
        start. A wsd run keeps measuring and sets it when the cooldown it implies is due; a cosine run once its speed
        is known (``speed_known``)."""
        t = self.recipe.train
        steps = self.steps_in_time(step, seconds_per_step)
        if t.schedule == "wsd" and steps - t.decay_steps(steps) > step:
            return  # still in the stable phase: measure on
        self.set_length(step, steps, seconds_per_step)

    def retime_to_time(self, step: int, seconds_per_step: float) -> None:
        """After its length is set, a run whose steps have slowed or sped up by more than RETIME_TOLERANCE of its steps
        left (and a step) moves its end to fill its time limit: a machine that slowed overran a 290 s run by 5-9 s,
        and steps that sped up after they were measured ended 900 s chat campaigns 17-61 s early. The schedule's rest
        is stretched or squeezed from this step's rate (``schedule.retimed``), so the rate never rises."""
        steps, now = self.steps_in_time(step, seconds_per_step), self.recipe.train.steps
        if abs(steps - now) > max(1, RETIME_TOLERANCE * (now - step)):  # a smaller miss: what steps_in_time keeps
            self.set_length(step, steps, seconds_per_step)

    @property
    def fixed_steps(self) -> int | None:
        """A time-limited run's length, once set (``fit_to_time``; a resumed run's from STEPS_FILE)."""
        return self.length_record.get("steps")

    def lr_factor(self):
        """The rate multiplier of this run's schedule: train.steps', or the length first set and each move since."""
        t, moves = self.recipe.train, self.length_record.get("retimed", [])
        if not moves:
            return t.lr_factor()
        first = moves[0]["from"]
        return retimed(t.lr_factor(first), first, [(m["at_step"], m["steps"]) for m in moves])

    def set_length(self, step: int, steps: int, seconds_per_step: float) -> None:
        """The run ends after ``steps``: first its schedule's decay is drawn to end there, later the rest of it is
        moved there (``STEPS_FILE`` keeps the length, the step it was first set at and each move, for a resume)."""
        t, was_set = self.recipe.train, self.fixed_steps is not None
        if was_set:
            record = {**self.length_record, "retimed": [*self.length_record.get("retimed", []), {
                "at_step": step, "from": t.steps, "steps": steps, "seconds_per_step": seconds_per_step}]}
        else:
            record = {"set_at_step": step, "seconds_per_step": seconds_per_step, "time_limit": t.time_limit}
        self.length_record = {**record, "steps": steps}
        self.recipe = replace(self.recipe, train=replace(t, steps=steps))
        self.sections = (self.recipe.train, *self.sections[1:])
        if self.layout.is_main:
            if was_set:
                print(f"time limit {t.time_limit:.0f}s: now {seconds_per_step:.3f}s a step, so {steps} steps in all "
                      f"(not {t.steps})")
            else:
                print(f"time limit {t.time_limit:.0f}s: {seconds_per_step:.3f}s a step, so {steps} steps in all")
            write_json_atomic(self.out / STEPS_FILE, self.length_record)
        if self.scheduler is not None:  # the JSON may name a DeepSpeed scheduler of its own
            factor, scheduler = self.lr_factor(), self.scheduler
            scheduler.lr_lambdas = [factor] * len(scheduler.lr_lambdas)
            for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * factor(scheduler.last_epoch)  # this step's rate too (last_epoch == step)

    def speed_known(self, measured: int, seconds: float) -> bool:
        """Whether a time-limited run has measured its speed long enough to set its length (``fit_to_time``). wsd: after
        one step, since it measures on until its cooldown is due. cosine: past its warm-up (whose steps do not depend
        on the length), PROBE_STEPS steps and a tenth of its time: five steps of chat conversations of uneven lengths
        set one 51 s short of its 240 s. Until then it trains at the peak rate, within about 2% of the
        cosine's."""
        t = self.recipe.train
        if t.schedule == "wsd":
            return measured >= 1
        return measured >= max(PROBE_STEPS, t.warmup) and seconds >= PROBE_SHARE * t.time_limit

    def reserve_probe_due(self, step: int) -> bool:
        t = self.recipe.train
        return (t.eval_reserve is not None and self.reserve_record is None and self.fixed_steps is not None
                and step >= RESERVE_PROBE_AT * t.end)

    def take_back_reserve(self, step: int) -> None:
        """Time one batch of the final evaluation's work (``evaluate_generative``: greedy generation and answer
        losses, on a random batch of training prompts) with this run's adapter, and move train.time_limit
        later by what train.eval_reserve holds beyond that pace for the test split (x RESERVE_MARGIN). The campaign
        reads the reserve from the base model, which generated a batch of Natural Questions in 30.6 s on one thread
        where the trained one took 6.8-7.8 s on two: it kept 466 s there for a final evaluation that took 229 s."""
        from floe_dist.evaluation import evaluate_generative

        (t, m, d, _), e = self.sections, self.recipe.evaluate
        tests = self.resources.examples(d, e.split, self.tokenizer)[: e.limit]
        prompted = [x for x in self.examples if x.generative and x.prompt]
        picked = np.random.default_rng(step).permutation(len(prompted))[: e.batch_size]
        batch = [prompted[i] for i in picked]
        began = time.perf_counter()
        evaluate_generative(e, m.max_length, self.model, self.lm, self.tokenizer, batch, self.layout.torch_device)
        seconds = time.perf_counter() - began
        self.model.train()
        batches = -(-len(tests) // e.batch_size)
        kept = min(t.eval_reserve, RESERVE_MARGIN * seconds * batches)
        self.reserve_record = {"at_step": step, "batch_examples": len(batch), "batch_seconds": seconds,
                               "test_batches": batches, "reserve": t.eval_reserve, "kept": kept,
                               "time_limit": t.time_limit + t.eval_reserve - kept}
        self.recipe = replace(self.recipe, train=replace(t, time_limit=self.reserve_record["time_limit"]))
        self.sections = (self.recipe.train, *self.sections[1:])
        print(f"final evaluation timed at step {step}: a batch of {len(batch)} took {seconds:.1f}s with this adapter, "
              f"so about {kept:.0f}s for the {len(tests)} test examples (x{RESERVE_MARGIN}) of the "
              f"{t.eval_reserve:.0f}s kept back: time limit {t.time_limit:.0f}s -> {self.recipe.train.time_limit:.0f}s")

    def fit(self) -> dict:
        t, m, d, p = self.sections
        start_step = self.resume()
        if start_step > t.end:
            raise ValueError(f"{self.ckpt_dir} holds a checkpoint at step {start_step}, past this run's end "
                             f"(step {t.end}); use another --output")
        log = (MetricsLog(self.out, start_step, t.trackers, self.recipe.flat()) if self.layout.is_main
               else None)
        pbar = tqdm(desc="train", disable=not self.layout.is_main, initial=start_step,
                    total=None if t.end == UNSET else t.end)
        self.step_seconds = 0.0  # time in optimizer steps only (a search trial's overhead is the rest)
        step, probe_start = start_step, time.perf_counter()
        since_set = None  # (step, time) from which a set length's speed is measured again
        while step < t.end:
            measured = step - start_step - 1  # steps since the first (which pays for warming caches up)
            probed = time.perf_counter() - probe_start
            if self.fixed_steps is None and t.time_limit and self.speed_known(measured, probed):
                self.fit_to_time(step, probed / measured)
            elif self.fixed_steps is not None and t.time_limit and measured > 0:
                since_set = since_set or (step, time.perf_counter())
                if step > since_set[0] and (step - since_set[0]) % RECHECK_EVERY == 0:
                    self.retime_to_time(step, (time.perf_counter() - since_set[1]) / (step - since_set[0]))
            if self.reserve_probe_due(step):  # its seconds are no step's: the speed is measured again after it
                speed = ((time.perf_counter() - since_set[1]) / (step - since_set[0])
                         if since_set and step > since_set[0] else self.length_record["seconds_per_step"])
                self.take_back_reserve(step)
                self.retime_to_time(step, speed)
                since_set = None
            if t is not self.recipe.train:
                t = self.recipe.train
                pbar.total = None if self.fixed_steps is None else t.end
            step_start = time.perf_counter()
            metrics = self.step(step)
            self.step_seconds += time.perf_counter() - step_start
            self.last_step_end = time.perf_counter()
            logged = step == start_step or (step + 1) % EXPERT_LOAD_EVERY == 0 or step + 1 == t.end
            expert_load = {k: v.tolist() for k, v in self.model.expert_load().items()} if logged else {}
            if t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.end):
                metrics["eval_loss"] = self.held_out_loss()
            if log:
                if t.capacity_factor <= 0:
                    metrics.pop("dropped_picks")
                log.write(step + 1, **metrics, step_seconds=time.perf_counter() - step_start,
                          expert_load=expert_load)
                pbar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or step + 1 == t.end:
                save_start = time.perf_counter()
                self.save(step + 1)
                self.longest_save = max(self.longest_save, time.perf_counter() - save_start)
            if step == start_step:
                probe_start = time.perf_counter()
            step += 1
            pbar.update()
        pbar.close()
        return self.export(start_step, log)

    def export(self, start_step: int, log: MetricsLog | None) -> dict:
        """The adapter in its replicated layout (loads with any --ep-size) and ``train.json``."""
        (t, m, d, p), layout = self.sections, self.layout
        saved_step, state = getattr(self, "saved", (None, None))
        if saved_step != t.end:  # the same decision on every rank: the gather is collective
            state = self.full_adapter()
        trainable = self.allocation.trainable_parameters
        summary = {"steps": t.end, "world_size": layout.world_size, "ep_size": p.ep_size,
                   "truncated_examples": self.truncated,
                   "trainable_parameters": trainable, "seconds": time.time() - self.t0, "resumed_from": start_step,
                   "step_seconds": self.step_seconds, "router": "compiled" if compiled_router_ran() else "eager",
                   "adapter_state_bytes_rank0": ds.local_state_bytes(self.engine)
                   + (self.experts.state_bytes() if self.experts else 0), "args": run_settings(self.recipe),
                   **({"eval_reserve": self.reserve_record} if self.reserve_record else {})}
        with main_rank_first():  # every rank returns once the adapter is written (a trial's ranks then evaluate it)
            if layout.is_main:
                save_adapter(self.out / "adapter", state, self.allocation,
                             {"base_model": m.name, "quant": m.quant, "task": d.name, "step": t.end})
                summary["final_loss"] = log.last.get("loss") if log.last else None
                if start_step < t.end:  # what followed the last step (its checkpoint, the export), and the slowest
                    # save: what a reserve for them could be sized from, rather than KEEP_AT_END's share of the limit
                    summary["closing_seconds"] = time.perf_counter() - self.last_step_end
                    summary["longest_save_seconds"] = self.longest_save
                write_json_atomic(self.out / "train.json", summary)
                log.close()
                print(f"trained {trainable:,} adapter parameters for {t.end} steps "
                      f"on {layout.world_size} rank(s) in {summary['seconds']:.0f}s -> {self.out / 'adapter'}")
        return summary


def _latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save_checkpoint(engine, ckpt_dir: Path, step: int, keep: int, is_main: bool,
                    experts: ExpertParallel | None = None) -> None:
    """Expert shards first, then DeepSpeed's tag folder and its ``latest`` pointer: a crash at any
    point leaves ``latest`` on the previous complete checkpoint."""
    if experts:
        experts.save(ckpt_dir / f"step_{step}")
    engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step}", client_state={"step": step},
                           exclude_frozen_parameters=True)
    if is_main:
        tags = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
