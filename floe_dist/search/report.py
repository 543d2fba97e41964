"""What a finished search says: per candidate allocation its best cost at the top budget, the margin over the
incumbent with that margin's paired standard error, and a plot of every trial's cost."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from floe_dist.search.ledger import Ledger, Trial


def base_of(config: dict, names: list[str]) -> str:
    """The candidate a trial's configuration scales (the only one when the space has no choice)."""
    return config.get("allocation", names[0])


def candidate_costs(report: dict[str, dict]) -> list[str]:
    """'name cost (+margin ± se, N trials)' per candidate, for the search's and the campaign's summaries."""
    def one(name: str, c: dict) -> str:
        if c["best_cost"] is None:
            return f"{name} - ({c['trials']} trials, none promoted that far)"
        margin = "" if not c.get("margin") else f"+{c['margin']:.4f}" + (
            f" ± {c['margin_se']:.4f}" if c.get("margin_se") is not None else "") + ", "
        return f"{name} {c['best_cost']:.4f} ({margin}{c['trials']} trials)"
    return [one(name, c) for name, c in report.items()]


def candidate_report(ledger: Ledger, names: list[str]) -> dict[str, dict]:
    """Per candidate allocation: trials run, and its best cost at the top budget any trial reached (the
    fidelity the incumbent is taken at, so the figures compare); with its margin over the incumbent and that
    margin's paired standard error over the validation examples (None where trials carry no per-example costs)."""
    ok = [t for t in ledger.trials if t.status == "success"]
    top = max((t.budget for t in ok), default=None)
    best = ledger.incumbent()
    report = {}
    for name in names:
        mine = [t for t in ledger.trials if base_of(t.config, names) == name]
        at_top = [t for t in ok if t.budget == top and base_of(t.config, names) == name]
        report[name] = {"trials": len(mine), "best_cost": None, "budget": top, "top_budget_trials": len(at_top),
                        "margin": None, "margin_se": None}
        if at_top:
            mine_best = min(at_top, key=lambda t: (t.cost, t.id))
            report[name].update(best_cost=mine_best.cost, margin=mine_best.cost - best.cost,
                                margin_se=paired_se(mine_best, best))
    return report


def paired_se(trial: Trial, incumbent: Trial) -> float | None:
    """Standard error of the mean of ``trial``'s per-example cost minus the incumbent's on the same validation
    examples: the noise of the margin between them (0 for the incumbent itself)."""
    mine, theirs = trial.metrics.get("example_costs"), incumbent.metrics.get("example_costs")
    if not mine or not theirs or len(mine) != len(theirs) or len(mine) < 2:
        return None
    diffs = [a - b for a, b in zip(mine, theirs)]
    return statistics.stdev(diffs) / math.sqrt(len(diffs))


def decide(ledger: Ledger, parameters, separation: float) -> tuple[Trial, list[Trial]]:
    """The configuration to train, and those its validation cost does not separate from the lowest one's.

    The lowest cost at the top budget wins unless a configuration with fewer adapter parameters (``parameters``
    of a trial) is within ``separation`` paired standard errors of it on the same validation examples: then the
    cheapest of those, so that a choice the validation set cannot resolve falls to the cheaper adapter instead of
    to float noise. Trials without per-example costs (generative tasks) are compared by their cost alone."""
    best = ledger.incumbent()
    top = [t for t in ledger.trials if t.status == "success" and t.budget == best.budget]

    def close(t: Trial) -> bool:
        se = paired_se(t, best)
        return t is best or (se is not None and t.cost - best.cost <= separation * se)
    tied = sorted((t for t in top if close(t)), key=lambda t: (parameters(t), t.cost, t.id))
    return tied[0], tied


def unresolved(report: dict[str, dict], won: str) -> list[str]:
    """The candidates whose best cost is within two paired standard errors of the winner's."""
    return [name for name, c in report.items() if name != won and c.get("margin_se") is not None
            and c["margin"] < 2 * c["margin_se"]]


def plot_search(ledger: Ledger, path: Path, max_steps: int) -> None:
    """Cost of every trial (colour = budget) and the incumbent at the top budget over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [t for t in ledger.trials if t.status == "success"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for budget in sorted({t.budget for t in ok}):
        pts = [t for t in ok if t.budget == budget]
        ax.scatter([t.id for t in pts], [t.cost for t in pts], s=18, label=f"{budget} steps")
    best, xs, ys = math.inf, [], []
    for t in sorted(ok, key=lambda t: t.id):
        if t.budget == max(x.budget for x in ok) and t.cost < best:
            best = t.cost
        if best < math.inf:
            xs.append(t.id)
            ys.append(best)
    ax.step(xs, ys, where="post", color="black", label="incumbent (top budget)")
    failed = [t.id for t in ledger.trials if t.status in ("crashed", "timeout")]
    for x in failed:
        ax.axvline(x, color="red", alpha=0.3, lw=1)
    ax.set_xlabel("trial" + (" (red: failed)" if failed else ""))
    ax.set_ylabel("validation cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
