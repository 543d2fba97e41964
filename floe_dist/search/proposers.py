"""What to try next: the exhaustive grid (for comparison) or SMAC (BO, multi-fidelity over steps; in random
mode the same fidelities and halving with random configurations, as the control).

Both speak ask/tell against the ledger; SMAC's state is saved after every ask and tell so a killed
search resumes with the same surrogate.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from floe_dist.files import write_json_atomic, write_text_atomic
from floe_dist.search import smac_patches
from floe_dist.search.ledger import FINISHED, Ledger, Trial, trial_key

if TYPE_CHECKING:
    from floe_dist.recipe import SearchSection


def build_space(args: SearchSection, seed: int):
    from ConfigSpace import Categorical, ConfigurationSpace, Constant, Float, OrdinalHyperparameter

    space = ConfigurationSpace(seed=seed)
    if len(args.candidate_files()) > 1:
        space.add(Categorical("allocation", list(args.candidate_files())))
    space.add(OrdinalHyperparameter("rank", args.rank_choices()))
    lo, hi = args.lr_range()
    space.add(Float("lr", (lo, hi), log=True) if hi > lo else Constant("lr", lo))
    if args.expert_choices():
        space.add(OrdinalHyperparameter("experts", args.expert_choices()))
    if args.top_k_choices():
        space.add(OrdinalHyperparameter("top_k", args.top_k_choices()))
    return space


def origin_of(config) -> str:
    """SMAC's ``config.origin`` in three words: the initial design, the model (the acquisition function
    chose it: local search, or random candidates sorted by it), or random (an interleaved random
    configuration, or one sampled while no result was in yet)."""
    text = str(getattr(config, "origin", "") or "")
    if text.lower().startswith("initial"):
        return "initial design"
    if any(s in text for s in ("Local Search", "(sorted)", "Differential Evolution")):
        return "model"
    # no origin: SMAC sampled it at random because no result had come back yet to fit the model on
    return "random" if "Random" in text or not text else text


def _steps(rungs: list[tuple[int, int]]) -> int:
    """Training steps of a bracket's rungs: configurations x steps, summed."""
    return sum(count * steps for count, steps in rungs)


def _trials(rungs: list[tuple[int, int]]) -> int:
    """Trials of a bracket's rungs."""
    return sum(count for count, _ in rungs)


def _trained(rungs: list[tuple[int, int]], below: int = 0) -> int:
    """Steps a bracket's rungs train: a promotion continues its configuration's checkpoint from the rung below
    (``below``: the steps of the rung under the first one given)."""
    trained = 0
    for count, steps in rungs:
        trained, below = trained + count * (steps - below), steps
    return trained


@dataclass(frozen=True)
class Limits:
    """What a search may issue in all: budget steps (``max_compute`` full trials) and trials; with a time limit,
    also the workers' seconds still free, priced per trial (loading, scoring) and per trained step as the finished
    trials measured (floe_dist/search/loop.py)."""
    steps: float
    trials: int
    seconds: float = math.inf
    per_trial: float = 0.0
    per_step: float = 0.0

    def hold(self, ledger: Ledger, steps: int, trials: int, trained: int) -> bool:
        """Whether ``trials`` more trials fit: their ``steps`` budget steps beside those issued, and their
        ``trained`` steps (a promotion trains only those beyond its checkpoint) in the seconds left."""
        return (ledger.compute_used() + steps <= self.steps and len(ledger.trials) + trials <= self.trials
                and trials * self.per_trial + trained * self.per_step <= self.seconds)


def _plain(config) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(config).items()}


class GridProposer:
    """Every rank x learning rate (x experts x top-k) point at ``--max-steps``, in a fixed order."""

    def __init__(self, args: SearchSection):
        lo, hi = args.lr_range()
        n = args.grid_lr_points if hi > lo else 1
        lrs = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if n > 1 else [lo]
        experts, top_ks = args.expert_choices() or [None], args.top_k_choices() or [None]
        candidates = list(args.candidate_files()) if len(args.candidate_files()) > 1 else [None]
        self.points = [{k: v for k, v in (("allocation", a), ("rank", r), ("lr", lr), ("experts", e), ("top_k", k))
                        if v is not None}
                       for a, r, e, k, lr in itertools.product(candidates, args.rank_choices(), experts, top_ks, lrs)]
        self.budget = args.max_steps

    def resume(self, ledger: Ledger) -> list[Trial]:
        for t in ledger.trials:
            t.told = t.status in FINISHED
        return [t for t in ledger.trials if t.status == "running"]

    def ask(self, ledger: Ledger) -> Trial | None:
        for point in self.points:
            if ledger.find(trial_key(point, self.budget)) is None:
                return ledger.add(point, self.budget, origin="grid")
        return None

    def tell(self, trial: Trial) -> None:
        trial.told = True

    learns = False  # a fixed list: results may arrive in any order

    def fits(self, ledger: Ledger, limits: Limits) -> bool:
        return True  # the grid runs every point: it is the reference the cap is measured against

    def waits(self, ledger: Ledger) -> bool:
        return False  # a fixed list: nothing to learn before the next point


class SmacProposer:
    """SMAC ask/tell with our own trial runner (its private parts touched only through ``smac_patches``). SMAC's
    state is saved after every ask and tell.

    SMAC writes its state files in place, so a kill -9 during a save can leave one of them empty. After every
    save the complete set is also kept in one file written atomically (``smac/state.json``), which a resumed
    search restores first; the ledger's reconciliation (``resume``) covers the step the copy may lag behind."""

    def __init__(self, args: SearchSection, out: Path):
        from smac import BlackBoxFacade as BB
        from smac import HyperparameterOptimizationFacade as HPO
        from smac import MultiFidelityFacade as MF
        from smac import Scenario

        multi = args.mode in ("smac", "random")
        facade = MF if multi else HPO
        budgets = dict(min_budget=args.min_steps, max_budget=args.max_steps) if multi else {}
        scenario = Scenario(build_space(args, args.seed), name="search", output_directory=out / "smac",
                            deterministic=True, n_trials=100_000, seed=args.seed, crash_cost=args.failed_cost,
                            **budgets)
        self.folder, self.state = Path(scenario.output_directory), out / "smac" / "state.json"
        self._restore()
        self._check_same_scenario(scenario)
        if not multi:
            intensifier = HPO.get_intensifier(scenario, max_config_calls=1)
        elif args.brackets == "hyperband":
            intensifier = MF.get_intensifier(scenario, eta=args.eta)
        else:
            from smac.intensifier.successive_halving import SuccessiveHalving

            intensifier = SuccessiveHalving(scenario, eta=args.eta)
        interleave = 1.0 if args.mode == "random" else args.random_interleave  # random: the control arm
        # BOHB's rule; twice as many won on the toy's calibration seeds and lost on its validation seeds
        min_points = args.model_min_points or len(scenario.configspace) + 1
        self.smac = facade(scenario, target_function=None, intensifier=intensifier, overwrite=False,
                           model=BB.get_model(scenario) if args.surrogate == "gp" else None,
                           random_design=facade.get_random_design(scenario, probability=interleave),
                           acquisition_maximizer=smac_patches.ordered_maximizer(facade, scenario),
                           initial_design=facade.get_initial_design(scenario, n_configs=args.initial_configs),
                           config_selector=smac_patches.model_selector(scenario, min_points, args.pending == "worst",
                                                                       args.model_data == "pooled", intensifier),
                           logging_level=40)
        smac_patches.distinct_configs(self.smac.intensifier, self.smac.runhistory)
        self.max_steps = args.max_steps
        self.brackets = []  # per bracket (Hyperband has several), [(configurations, steps), ...] per rung
        if multi:
            self.brackets = smac_patches.bracket_rungs(intensifier)
        self.multi, self.mode = multi, args.mode
        if multi:
            self._promotions_first()
        self.asked: dict[str, object] = {}  # trial key -> SMAC's own TrialInfo (tell must match it exactly)

    def _restore(self) -> None:
        """SMAC's files as of the last complete save. Without a saved copy an unreadable file is an error: a
        SMAC state rebuilt from nothing could propose trials the ledger already holds."""
        if self.state.is_file():
            for name, text in json.loads(self.state.read_text()).items():
                write_text_atomic(self.folder / name, text)
            return
        for path in sorted(self.folder.glob("*.json")):
            try:
                json.loads(path.read_text())
            except ValueError:
                raise ValueError(f"{path} is unreadable (the search was killed while SMAC wrote it) and there is "
                                 f"no saved copy ({self.state}); start the search in another --output") from None

    def _snapshot(self) -> None:
        write_json_atomic(self.state, {f.name: f.read_text() for f in sorted(self.folder.glob("*.json"))})

    @staticmethod
    def _check_same_scenario(scenario) -> None:
        """SMAC asks on stdin when a saved run differs; we check first and fail with a message."""
        from smac import Scenario

        def plain(sc) -> dict:  # the facade adds its own ``_meta`` later: compare everything else
            return {k: v for k, v in Scenario.make_serializable(sc).items() if k != "_meta"}

        saved = Path(scenario.output_directory) / "scenario.json"
        if saved.is_file() and plain(Scenario.load(saved.parent)) != plain(scenario):
            raise ValueError(f"{saved.parent} holds a SMAC run with another search space or seed; "
                             f"use another --output, or the same flags to resume it")

    def _info(self, trial: Trial):
        from ConfigSpace import Configuration
        from smac.runhistory.dataclasses import TrialInfo

        if trial.key in self.asked:
            return self.asked[trial.key]
        config = Configuration(self.smac.scenario.configspace, values=trial.config)
        return TrialInfo(config, seed=trial.smac_seed, budget=float(trial.budget) if self.multi else None)

    learns = True  # what it proposes depends on the results it was told: they reach it in trial order

    def resume(self, ledger: Ledger) -> list[Trial]:
        """Reconcile SMAC's runhistory with the ledger; return the trials to issue again."""
        from smac.runhistory.enumerations import StatusType

        rh = self.smac.runhistory
        for info in rh.get_running_trials():
            self.asked[trial_key(_plain(info.config), info.budget if self.multi else self.max_steps)] = info
        smac_state = {}
        for k, v in rh.items():
            budget = k.budget if self.multi else self.max_steps
            smac_state[trial_key(_plain(rh.get_config(k.config_id)), budget)] = (k, v.status)
        for key, (k, status) in smac_state.items():  # asked by SMAC, unknown to the ledger: issue it
            if status == StatusType.RUNNING and ledger.find(key) is None:
                info = json.loads(key)
                first = next((t.origin for t in ledger.trials if t.config == info["config"] and t.origin), None)
                ledger.add(info["config"], info["budget"], smac_seed=k.seed,
                           origin=first or origin_of(rh.get_config(k.config_id)))
        for trial in ledger.trials:  # finished here, not (yet) told to SMAC: tell it now
            known = smac_state.get(trial.key)
            if trial.status in FINISHED and (known is None or known[1] == StatusType.RUNNING):
                self.tell(trial)
            trial.told = trial.status in FINISHED
        return [t for t in ledger.trials if t.status == "running"]

    def ask(self, ledger: Ledger) -> Trial | None:
        try:
            info = self.smac.ask()
        except StopIteration:  # SMAC found no new configuration: the space is exhausted
            return None
        self.smac.optimizer.save()  # the RUNNING entry is durable before the trial starts
        self._snapshot()
        budget = int(round(info.budget)) if self.multi else self.max_steps
        config = _plain(info.config)
        # a promotion comes back without its origin: the configuration's proposer is whoever proposed it first
        first = next((t.origin for t in ledger.trials if t.config == config and t.origin), None)
        trial = ledger.add(config, budget, smac_seed=info.seed, origin=first or origin_of(info.config))
        self.asked[trial.key] = info
        return trial

    def fits(self, ledger: Ledger, limits: Limits) -> bool:
        """Whether the next trial fits the limits. The steps, trials and seconds every started bracket still
        needs (its rungs' trials not yet issued, and all its promotions) are reserved, and a new bracket is started
        only when all of it fits: a bracket cut off by a limit wastes its cheap trials (the incumbent is taken at
        the top budget). Read from SMAC's own brackets, so the same rule holds for successive halving and for
        Hyperband's brackets of different shapes. Under step or trial limits smaller than a bracket, one top-budget
        trial must fit."""
        if len(ledger.trials) >= limits.trials:
            return False
        if not self.brackets or any(_steps(r) > limits.steps or _trials(r) > limits.trials for r in self.brackets):
            return limits.hold(ledger, self.max_steps, 1, self.max_steps)  # limits below a bracket: as far as they go
        steps, trials, trained, runnable = self._open_brackets(ledger)
        if not runnable:
            rungs = self.brackets[smac_patches.next_bracket(self.smac.intensifier)]
            steps, trials, trained = steps + _steps(rungs), trials + _trials(rungs), trained + _trained(rungs)
        return limits.hold(ledger, steps, trials, trained)

    def _open_brackets(self, ledger: Ledger) -> tuple[int, int, int, bool]:
        """What the started brackets still need (budget steps, trials and steps to train: rung trials not yet
        issued and every promotion), and whether one of them has a trial to issue now (else SMAC's next ask draws
        a new bracket)."""
        intensifier = self.smac.intensifier
        issued = {t.key: t for t in ledger.trials}
        steps_left, trials_left, trained_left = 0, 0, 0  # what the started brackets still need
        runnable = False  # a started bracket has a trial to issue (SMAC asks for it first)
        for (bracket, stage), groups in smac_patches.rung_groups(intensifier):
            rungs = self.brackets[bracket]
            steps, below = rungs[stage][1], rungs[stage - 1][1] if stage else 0
            for _, configs in groups:
                trials = [issued.get(trial_key(_plain(c), steps)) for c in configs]
                unissued = sum(t is None for t in trials)
                steps_left += unissued * steps + _steps(rungs[stage + 1:])
                trials_left += unissued + _trials(rungs[stage + 1:])
                trained_left += unissued * (steps - below) + _trained(rungs[stage + 1:], steps)
                promoted = stage + 1 < len(rungs) and all(t is not None and t.told for t in trials)
                runnable |= unissued > 0 or promoted
        return steps_left, trials_left, trained_left, runnable

    def waits(self, ledger: Ledger) -> bool:
        """Whether a free worker should wait for a running trial's result rather than ask now: the next trial would
        be a new configuration, the initial design is used up, and no budget holds enough results for the model,
        so SMAC would draw it at random. Seen in the default campaign (2 workers, Hyperband): the second bracket's
        configurations were drawn from 2 results at random while the trial bringing the third was running."""
        if self.mode == "random" or all(t.told for t in ledger.trials):
            return False  # the control arm draws at random anyway; with nothing running, waiting would never end
        if self.multi and self._open_brackets(ledger)[-1]:  # runnable
            return False  # a started bracket has a trial to issue: no new configuration is drawn
        return smac_patches.initial_design_used(self.smac) and not smac_patches.model_has_data(self.smac)

    def tell(self, trial: Trial) -> None:
        from smac.runhistory.dataclasses import TrialValue
        from smac.runhistory.enumerations import StatusType

        trial.told = True
        status = {"success": StatusType.SUCCESS, "timeout": StatusType.TIMEOUT}.get(trial.status, StatusType.CRASHED)
        cost = trial.cost if trial.status == "success" else self.smac.scenario.crash_cost
        self.smac.tell(self._info(trial), TrialValue(cost=cost, time=trial.seconds or 0.0, status=status))
        self._snapshot()
        if self.multi:
            self._promotions_first()

    def _promotions_first(self) -> None:
        """Make successive halving (and Hyperband) issue promotions before new configurations, and draw a new
        bracket only when nothing else can run.

        SMAC's bracket generator walks its tracker once per pass and stays suspended inside it between asks, so with
        several workers it kept opening fresh lowest-budget groups while a finished rung waited for its promotions
        (measured: 26 cheap trials before the first promotion with 2 workers). Walking the highest stages first
        fixed that but not the rest: a rung completed during a pass promotes into a stage the pass has already
        walked, so the pass found nothing to run and drew the next bracket. With one worker the second bracket's
        configurations were drawn as soon as the first rung's results were in, from a model that had not seen one
        result above the lowest budget, and a new configuration ran before the last promotion. Now each trial
        comes from a fresh pass from the lowest stage up (a promotion is then walked in the same pass, and a new
        bracket is drawn only when every trial of the open ones is running), and when a higher budget than the
        trial's is waiting, from a second pass that walks the highest budgets first. Touches private attributes of
        smac 2.4.1 (pinned).
        """
        smac_patches.replace_trial_generator(self.smac, self._trials())

    def _trials(self):
        while True:
            try:
                info = smac_patches.first_trial(self.smac.intensifier, highest_first=False)
                if smac_patches.promotion_waiting_above(self.smac.intensifier, info.budget):
                    # the trial is not SMAC's until asked: SMAC yields it again
                    info = smac_patches.first_trial(self.smac.intensifier, highest_first=True)
            except StopIteration:  # no configuration left: SMAC's ask ends the search
                return
            yield info
