"""``search.json``: every trial of a search and its fate, rewritten atomically after every event.

Resume rests on it: a finished trial is recorded before the proposer hears of it, so a search
killed at any point loses and repeats no finished trial.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from floe_dist.files import write_json_atomic

if TYPE_CHECKING:
    from floe_dist.recipe import SearchSection

FINISHED = ("success", "crashed", "timeout")
SEARCH_FORMAT = "floe-dist/search@1"


@dataclass
class Trial:
    id: int
    config: dict
    budget: int
    seed: int
    status: str = "running"  # running | success | crashed | timeout
    cost: float | None = None
    seconds: float | None = None
    worker: str = ""
    attempts: int = 0
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    smac_seed: int | None = None
    origin: str = ""  # who proposed the configuration: initial design | model | random | grid
    told: bool = False  # its result has reached the proposer (in trial order: floe_dist/search/loop.py)

    @property
    def key(self) -> str:
        return trial_key(self.config, self.budget)


def trial_key(config: dict, budget: float) -> str:
    return json.dumps({"config": config, "budget": int(round(budget))}, sort_keys=True)


class Ledger:
    """``search.json``: every trial and its fate, rewritten atomically after every event."""

    def __init__(self, path: Path, args: SearchSection):
        self.path, self.args = path, args
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.trials = [Trial(**t) for t in data.get("trials", [])]
        self.extra: dict = {}

    def add(self, config: dict, budget: int, smac_seed: int | None = None, origin: str = "") -> Trial:
        trial = Trial(len(self.trials), config, budget, self.args.trial_seed, smac_seed=smac_seed, origin=origin)
        self.trials.append(trial)
        self.save()
        return trial

    def find(self, key: str) -> Trial | None:
        return next((t for t in self.trials if t.key == key), None)

    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status in FINISHED]

    def resumes_from(self, trial: Trial) -> int:
        """The step a trial starts from: the largest budget an earlier trial of its configuration trained (trials
        of one configuration share a line of checkpoints, floe_dist/stages/search.py)."""
        return max((t.budget for t in self.trials if t.id < trial.id and t.config == trial.config
                    and t.status == "success"), default=0)

    def compute_used(self) -> int:
        return sum(t.budget for t in self.trials)

    def incumbent(self) -> Trial | None:
        """Best successful trial at the largest budget that has one (the most trusted fidelity)."""
        ok = [t for t in self.trials if t.status == "success"]
        if not ok:
            return None
        top = max(t.budget for t in ok)
        return min((t for t in ok if t.budget == top), key=lambda t: (t.cost, t.id))

    def top_budget_origins(self) -> dict[str, int]:
        """How many configurations that reached the top budget each origin proposed."""
        ok = [t for t in self.trials if t.status == "success"]
        top = max((t.budget for t in ok), default=None)
        configs = {json.dumps(t.config, sort_keys=True): t.origin for t in ok if t.budget == top}
        return {origin: list(configs.values()).count(origin) for origin in sorted(set(configs.values()))}

    def save(self) -> None:
        write_json_atomic(self.path, {"format": SEARCH_FORMAT, "args": asdict(self.args),
                                      "trials": [asdict(t) for t in self.trials], **self.extra})
