"""Every place floe-dist reaches into SMAC's private attributes, in one module tied to the SMAC it was tested on.

The search drives SMAC 2.4.1 through ask/tell and changes some of its behaviour (repeatable local search, no
configuration proposed twice, what the model learns from, promotions first, the compute cap read from SMAC's own
brackets). Those changes touch attributes SMAC does not promise to keep, so importing this module checks the
installed version against ``SUPPORTED`` and refuses any other with the range named; pyproject.toml pins the same.
"""
from __future__ import annotations

SUPPORTED = ("2.4.1",)  # the versions these patches were written and tested against


def check_version() -> None:
    from importlib.metadata import version

    installed = version("smac")
    if installed not in SUPPORTED:
        raise ImportError(f"floe-dist's search patches SMAC's internals and supports smac {', '.join(SUPPORTED)}; "
                          f"smac {installed} is installed (pip install smac=={SUPPORTED[-1]})")


check_version()


def ordered_maximizer(facade, scenario):
    """SMAC's acquisition maximizer with its local-search start points in a fixed order.

    SMAC 2.4.1 dedupes the start points through a ``set`` of Configurations, whose hash is that of a string,
    so their order, and every random draw of the local search after it, changed with Python's per-process
    hash seed: two runs with the same seed and results proposed different configurations from the first
    model proposal on. Sorting the start points by their encoded values makes a search repeatable (and a
    resumed one continue as the uninterrupted one would).
    """
    from smac.acquisition.maximizer.local_search import LocalSearch

    class OrderedLocalSearch(LocalSearch):
        def _get_init_points_from_previous_configs(self, *args, **kwargs):
            points = super()._get_init_points_from_previous_configs(*args, **kwargs)
            return sorted(points, key=lambda config: config.get_array().tobytes())

    maximizer = facade.get_acquisition_maximizer(scenario)
    maximizer._local_search.__class__ = OrderedLocalSearch
    return maximizer


def distinct_configs(intensifier, runhistory, patience: int = 1000) -> None:
    """Make SMAC's stream of new configurations skip those it already proposed.

    While no result is in, SMAC 2.4.1's config selector samples the configuration space without checking what it
    proposed before, from a space seeded like the initial design's copy, so its first random configuration was the
    initial design's first (every toy search's first bracket held one configuration twice; halving promoted it
    twice, and the next bracket opened before the first had all its results). ``patience`` repeats in a row end
    the stream, SMAC's own signal that the space is exhausted.
    """
    inner = intensifier._config_generator

    def stream():
        issued = set(runhistory.get_configs())  # on resume: everything already run or drawn into a rung
        rungs = getattr(intensifier, "_tracker", {})  # successive halving's rungs (bo mode's intensifier has none)
        issued.update(c for stage in rungs.values() for _, configs in stage for c in configs)
        repeats = 0
        for config in inner:
            if config not in issued:
                repeats = 0
                issued.add(config)
                yield config
            elif (repeats := repeats + 1) >= patience:
                return

    intensifier._config_generator = stream()


def model_selector(scenario, min_trials: int, lie: bool, pooled: bool, intensifier):
    """SMAC's config selector, or one that changes what the model learns from.

    ``pooled``: every configuration at the highest budget it reached, instead of SMAC's rule (the highest budget
    holding ``min_trials`` results). On the toy that rule fitted the model on 3 to 6 results at 90 steps and it
    proposed learning rates that dozens of 30-step results had already ruled out (seed 105).

    ``lie``: every configuration proposed and not yet run counts as a result as bad as the worst seen (a constant
    liar, Ginsbourger et al. 2010). Successive halving draws a whole rung (9 configurations) before any of them has
    run, so SMAC 2.4.1 takes them from one fit, the acquisition function's best few, which sit side by side: on the
    toy (seed 203) a rung held rank 5 nine times at learning rates 0.068-0.092. The lie makes each proposal move the
    next one away. The model is retrained before every proposal, since one lie replaced by its result leaves the
    number of data points, SMAC's cue to retrain, unchanged."""
    import numpy as np
    from smac.main.config_selector import ConfigSelector
    from smac.utils.configspace import convert_configurations_to_array

    if not lie and not pooled:
        return ConfigSelector(scenario, retrain_after=1, min_trials=min_trials)

    class ModelSelector(ConfigSelector):
        def _collect_data(self):
            X, Y, configs = self._pooled_data() if pooled else super()._collect_data()
            if not lie or X.shape[0] == 0:
                return X, Y, configs
            self._previous_entries = -1  # retrain on every call: the lies change the data
            # successive halving's open rungs, read now: SMAC replaces the dict when it restores a saved search
            runs, rungs = self._runhistory, getattr(intensifier, "_tracker", {})
            done = {c for c in runs.get_configs() if runs.get_trials(c, highest_observed_budget_only=False)}
            in_rungs = (c for stage in rungs.values() for _, configs in stage for c in configs)
            drawn = {*self._processed_configs, *in_rungs}
            # sorted, so that a resumed search (its rungs restored, its own list rebuilt) trains on the same rows
            pending = sorted(drawn - done, key=lambda config: config.get_array().tobytes())
            if not pending:
                return X, Y, configs
            lies = convert_configurations_to_array(pending)
            if lies.shape[1] != X.shape[1]:  # instance features: not used by floe-dist
                return X, Y, configs
            worst = np.repeat(Y.max(axis=0, keepdims=True), len(pending), axis=0)
            return np.vstack([X, lies]), np.vstack([Y, worst]), configs

        def _pooled_data(self):
            """Every configuration's result at the highest budget it reached, transformed together (one scale)."""
            encoder = self._runhistory_encoder
            X, Y = encoder.transform()  # finished trials in the order of the keys below, then timeouts (left out)
            keys = list(encoder._get_considered_trials())
            highest = {}
            for row, key in enumerate(keys):
                if key.config_id not in highest or key.budget > keys[highest[key.config_id]].budget:
                    highest[key.config_id] = row
            rows = sorted(highest.values())
            if len(rows) < self._min_trials:  # too few to learn from: SMAC samples at random
                return np.empty((0, 0)), np.empty((0,)), np.empty((0, 0))
            self._considered_budgets = sorted({key.budget for key in keys})
            self._previous_entries = -1  # a promotion's result replaces a row: retrain although the count is the same
            return X[rows], Y[rows], encoder.get_configurations()

    return ModelSelector(scenario, retrain_after=1, min_trials=min_trials)


def bracket_rungs(intensifier) -> list[list[tuple[int, int]]]:
    """Per bracket (Hyperband has several), [(configurations, steps), ...] per rung. SMAC sizes its brackets in
    ``__post_init__`` at its first ask; the compute cap needs them before."""
    intensifier.__post_init__()
    budgets = intensifier._budgets_in_stage
    return [[(count, int(round(steps))) for count, steps in zip(counts, budgets[bracket])]
            for bracket, counts in sorted(intensifier._n_configs_in_stage.items())]


def next_bracket(intensifier) -> int:
    """The bracket SMAC opens next (successive halving: 0)."""
    return getattr(intensifier, "_next_bracket", 0)


def rung_groups(intensifier):
    """((bracket, stage), [(seed, configurations), ...]) of every open rung."""
    return intensifier._tracker.items()


def initial_design_used(smac) -> bool:
    """Whether every configuration of the initial design has been asked."""
    asked = set(smac.runhistory.get_configs())
    return all(config in asked for config in smac._config_selector._initial_design_configs)


def model_has_data(smac) -> bool:
    """Whether the config selector has results to fit its model on (else its next proposal is random)."""
    return smac._config_selector._collect_data()[0].shape[0] > 0


def replace_trial_generator(smac, generator) -> None:
    """Make ``smac.ask()`` take its trials from ``generator``."""
    smac.optimizer._trial_generator = generator


def first_trial(intensifier, highest_first: bool):
    """One pass of SMAC's tracker in the given order (lowest stage first, or highest budget first), up to the first
    trial it yields."""
    for bracket, stages in intensifier._max_iterations.items():  # successive halving: one bracket
        for stage in range(stages):
            intensifier._tracker.setdefault((bracket, stage), [])

    def order(item):
        (bracket, stage), _ = item
        return (-intensifier._budgets_in_stage[bracket][stage], bracket) if highest_first else (stage, bracket)

    stages = sorted(intensifier._tracker.items(), key=order)
    intensifier._tracker.clear()
    intensifier._tracker.update(stages)
    return next(iter(intensifier))


def promotion_waiting_above(intensifier, budget: float) -> bool:
    """Whether a configuration promoted to a budget above ``budget`` has not been issued there yet."""
    for (bracket, stage), groups in intensifier._tracker.items():
        if intensifier._budgets_in_stage[bracket][stage] <= budget:
            continue
        for seed, configs in groups:
            keys = intensifier._get_instance_seed_budget_keys_by_stage(bracket=bracket, stage=stage, seed=seed)
            if any(intensifier._get_next_trials(config, from_keys=keys) for config in configs):
                return True
    return False
