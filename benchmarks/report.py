"""Regenerate the tables of BENCHMARKS.md (and docs/history.md, the superseded runs) from benchmarks/results/.

    python benchmarks/report.py           # rewrite every marked table in both documents
    python benchmarks/report.py --check   # exit 1 if a table differs from its result file, or a table is unmarked
    python benchmarks/report.py --plot    # also redraw docs/results.png (README's plot) from its result files

A table lives between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME picks a renderer below,
which only formats what the result file holds (the scripts compute every figure, ratios included).
Each rendered block starts with the script and the result file it comes from, and says when the
figures were transcribed from an earlier run's printed output rather than written by the script.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BENCHMARKS = REPO / "BENCHMARKS.md"
DOCUMENTS = [BENCHMARKS, REPO / "docs" / "history.md"]
BLOCK = re.compile(r"<!-- table: (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)
sys.path.insert(0, str(REPO))

from benchmarks.bench_campaign import overhead_share  # noqa: E402  (one definition, the script's)


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def source(data: dict, file: str) -> str:
    transcribed = {r.get("provenance", data["provenance"]).startswith("transcribed") for r in data["rows"]} or \
        {data["provenance"].startswith("transcribed")}
    commands = {r.get("command", data["command"]) for r in data["rows"]} or {data["command"]}
    mixed = "rows from several runs: those marked † were transcribed from an earlier run's printed table"
    how = {frozenset({True}): "transcribed from an earlier run's printed table",
           frozenset({False}): "written by the script"}.get(frozenset(transcribed), mixed)
    command = "; ".join(f"`{c}`" for c in sorted(commands))
    return f"Source: `{data['script']}` → `benchmarks/results/{file}.json` ({how}); command: {command}"


def dagger(row: dict) -> str:
    """† after a row's label when that row of a merged file was transcribed, not written by the script."""
    return " †" if row.get("provenance", "").startswith("transcribed") else ""


def pct(x, digits=1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def seeds(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def mean_std(row) -> str:
    return f"{row['mean']:.1f}" if row.get("std") is None else f"{row['mean']:.1f} ± {row['std']:.1f}"


# ------------------------------------------------------------------------------------------ renderers
def foundation(d):
    rows = [[r["arm"], f"{r['trainable']:,}", f"{r['median_step_s']:.3f} s"] for r in d["rows"]]
    mem = d["backbone_mib"]
    return (table(["arm (q_proj + v_proj, every layer)", "trainable parameters", "median step"], rows)
            + f"\n\n- step-time ratio LoRA-MoE / PEFT LoRA, same layers and targets, matched parameters: "
              f"**{d['step_ratio']:.3f}** (goal ≤ 1.2)\n- backbone memory NF4 / fp32: {mem['nf4']:.1f} / "
              f"{mem['fp32']:.1f} MiB = **{d['memory_ratio']:.3f}** (goal ≤ 0.35)")


def campaign(d):
    rows = []
    for r in d["rows"]:
        t = r["stage_seconds"]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in t.items())
        rows.append([f"{r['model']} / {r['task']}, {r['ranks']} ranks",
                     f"layers {r['layers']}, rank {r['expert_ranks']}, "
                     f"lr {r['lr']:.2e}", f"{r['trainable_parameters']:,}", pct(r["zero_shot_accuracy"], 2),
                     f"**{pct(r['final_accuracy'], 2)}**", f"{sum(t.values()):.0f} s ({stages})"])
    return table(["campaign", "allocation", "trainable params", "zero-shot", "final", "wall time (per stage, s)"], rows)


def campaign_repeat(d):
    """Runs of one recipe and seed: the budget spent, the choice made, the steps carried over."""
    rows = []
    for r in d["rows"]:
        s = r["search"]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())
        rows.append([r["run"] if "arm" not in r else f"{r['run']}: {r['arm']}",
                     f"{r['wall_s']:.0f} s of {r['budget_s']:.0f} s ({stages})",
                     f"{s['allocation']}, r={s['rank']}, lr {s['lr']:.3e}",
                     f"{s['trials']} ({s['trained_steps']} steps trained, {s['steps_reused']} continued from promoted "
                     f"trials' checkpoints)", busy(s["trials_run"], r["stage_seconds"]["search"]),
                     f"{overhead_share(s['trials_run'], r['stage_seconds']['search']):.0%}",  # bench_campaign.py's
                     f"{r['train_steps']} (the first {r['steps_reused']} the winning trial's)",
                     f"**{pct(r['final_accuracy'])}**"])
    return table(["run", "wall (per stage, s)", "choice", "search trials", "each worker's trials: seconds (steps)",
                  "search overhead share", "final run's steps", "test accuracy"], rows)


def campaign_length(d):
    """Budgeted campaigns' final runs: the length set from their speed and each move of its end since."""
    rows = []
    for r in d["rows"]:
        length = r["final_length"]
        moves = "; ".join(f"step {m['at_step']}: {m['from']} → {m['steps']} ({m['seconds_per_step']:.2f} s a step)"
                          for m in length.get("retimed", [])) or "none"
        rows.append([r.get("arm", r["run"]), f"{r['wall_s']:.0f} s of {r['budget_s']:.0f} s",
                     f"{length['time_limit']:.0f} s", f"{r['stage_seconds']['train']:.0f} s",
                     f"{length['steps'] if 'retimed' not in length else length['retimed'][0]['from']} at step "
                     f"{length['set_at_step']} ({length['seconds_per_step']:.2f} s a step)", moves,
                     f"{r['train_steps']}", f"{r['closing_seconds']:.1f} s", f"**{pct(r['final_accuracy'])}**"])
    return table(["run", "campaign wall", "final run's time limit", "train stage", "length first set",
                  "moves of its end", "final steps", "after the last step (checkpoint, export)", "test score"], rows)


def final_eval_reserve(d):
    """Budgeted campaigns on a generative task: the final evaluation's reserve read from the base model, what the final
    run timed of it with its own adapter and took back, and what the final evaluation then took."""
    rows = []
    for r in d["rows"]:
        probe, zero_shot = r.get("eval_reserve"), r["zero_shot_eval"]
        timed = (f"step {probe['at_step']}: {probe['batch_examples']} questions in {probe['batch_seconds']:.1f} s, "
                 f"{probe['test_batches']} batches → {probe['kept']:.0f} s kept, time limit +"
                 f"{probe['reserve'] - probe['kept']:.0f} s" if probe else "not timed")
        rows.append([r.get("arm", r["run"]), f"{r['wall_s']:.0f} s of {r['budget_s']:.0f} s",
                     f"{zero_shot['reserve_seconds']:.0f} s", timed, f"{r['stage_seconds']['train']:.0f} s",
                     f"{r['train_steps']}", f"{r['stage_seconds']['final_eval']:.0f} s",
                     f"**{pct(r['final_accuracy'])}**"])
    return table(["run", "campaign wall", "reserve read from the base model", "timed by the final run, taken back",
                  "train stage", "final steps", "final evaluation", "test score"], rows)


def job_budget(d):
    """Campaigns given ``campaign.budget: job`` in a real sbatch job: each run of the job against its time limit."""
    rows = []
    for r in d["rows"]:
        read = [re.search(r"has (\d+)s left; the campaign spends (\d+)s", run.get("budget_line", "")) for run in
                r["runs"]]  # the line each run of the campaign printed
        runs = "; ".join(f"{run['seconds']:.0f} s, {run['ended'].lower()}"
                         + (f" (read {m[1]} s left, spends {m[2]} s)" if m else "") for run, m in zip(r["runs"], read))
        stages = ", ".join(f"{k} {v:.0f}" for k, v in (r["stage_seconds"] or {}).items())
        rows.append([r["arm"], f"{r['time_limit_s']:.0f} s", runs, r["final_state"], stages, f"{r['train_steps']}",
                     f"**{pct(r['final_accuracy'])}**" if r["final_accuracy"] is not None else "none"])
    return table(["job", "--time", "each run: seconds running, how it ended (the time left it read, what it spends)",
                  "job ended", "stage seconds (each stage's finishing run)", "final steps", "test accuracy"], rows)


def busy(trials: list[dict], search_s: float) -> str:
    """Per worker, its trials' wall seconds and steps in order (then its spare work's), and what of the search stage's
    time they filled."""
    out = []
    for worker in sorted({t["worker"] for t in trials}):
        mine = [t for t in trials if t["worker"] == worker]
        spent = sum(t["seconds"] for t in mine)
        runs = " + ".join(f"{t['seconds']:.0f} ({t['steps']})" if "spare" not in t else
                          f"{t['seconds']:.0f} ({t['spare'].removeprefix('the ')})" for t in mine)
        out.append(f"{worker}: {runs} = {spent:.0f} s, {spent / search_s:.0%} of the search's {search_s:.0f} s")
    return "; ".join(out)


def floe_layers(d):
    rows = [[r["arm"], mean_std(r), seeds(r["per_seed"]), f"{r['trainable']:,}"] for r in d["rows"]]
    n = len(d["rows"][0]["per_seed"])
    return table(["arm", f"accuracy % (mean ± std, {n} seed{'s' * (n > 1)})", "per seed", "trainable params"], rows)


def search_throughput(d):
    rows = [[r["preset"] + dagger(r), r["trial"], f"{r['one_worker_per_h']:.1f} trials/h",
             f"{r['two_workers_per_h']:.1f} trials/h",
             f"**{r['ratio']:.2f}×**"] for r in d["rows"]]
    return table(["preset", "trial", "1 worker", "2 workers", "ratio (goal ≥ 1.7×)"], rows)


def search_compute(d):
    def point(text: str) -> str:
        return text.replace("e-0", "e-")  # one exponent style for transcribed and written rows

    rows = [[f"{r['preset']} (budgets {r['budgets']}){dagger(r)}", f"{r['grid_steps']}, {r['grid_wall_s']} s",
             f"{point(r['grid_best'])} ({r['grid_best_cost']:.4f})",
             f"{r['smac_steps']} ({r['smac_share']:.0%}), {r['smac_wall_s']} s"
             + (f"; {r['smac_note']}" if r["smac_note"] else ""),
             f"{point(r['smac_incumbent'])} ({r['smac_cost']:.4f})", f"{r['grid_cost_at_smac_rank']:.4f}"]
            for r in d["rows"]]
    return table(["preset", "grid: steps, wall", "grid best (cost)", "SMAC: steps (share of grid), wall",
                  "SMAC incumbent (cost)", "grid's best cost at SMAC's rank"], rows)


def search_workers(d):
    cold = all(r["vs_cold_1"] is not None for r in d["rows"])
    rows = [[r["arm"], r["trial"], f"{r['trials']}", f"{r['wall_s']:.0f} s", f"{r['trials_per_h']:.1f}",
             f"{r['mean_trial_s']:.1f} s", f"**{r['overhead_share']:.0%}**",
             *([f"{r['vs_cold_1']:.2f}×"] if cold else [])] for r in d["rows"]]
    return table(["arm", "trial", "trials", "search wall", "trials/h", "mean trial wall", "overhead share",
                  *(["trials/h vs cold"] if cold else [])], rows) + (
        (f"\n\nWarm, 2 workers vs 1: **{d['two_vs_one_workers']:.2f}×** trials per hour (goal ≥ 1.7×)."
         if d["two_vs_one_workers"] is not None else "\n") + f" Identical costs in every arm: {d['identical_costs']}.")


def search_methods(d):
    rows = [[r["method"], f"{r['reached']}/{r['seeds']}", f"{r['mean_compute_to_target']:.2f}",
             ", ".join("–" if c is None else f"{c:.2f}" for c in r["compute_to_target"]),
             f"{r['mean_final_cost']:.4f} ({r['final_within_target']}/{r['seeds']} within)",
             f"{r['model_share_top_budget']:.0%}"] for r in d["rows"]]
    return table(["method", "seeds within ε", f"mean compute to ε (miss = {d['max_compute']:g})",
                  "per seed (full trials)", "mean final cost", "model share of top-budget configs"], rows) + (
        f"\n\nGrid: best cost {d['grid_best']:.4f} after {d['grid_full_trials']:.0f} full trials; "
        f"ε = {d['epsilon']:.0%} (target ≤ {d['grid_best'] * (1 + d['epsilon']):.4f}); "
        f"initial design {d['initial_configs']} configurations; budget {d['max_compute']:g} full trials per search.")


def eval_choice_scoring(d):
    rows = [[r["task"], f"{r['examples']} × {r['choices']}", f"{r['pairwise_s']:.1f} s", f"{r['shared_prompt_s']:.1f} s",
             f"**{r['speedup']:.2f}×**", f"{r['max_abs_score_diff']:.1e}",
             f"{r['accuracy_pairwise']:.3f} / {r['accuracy_shared_prompt']:.3f}"] for r in d["rows"]]
    return table(["task", "examples × choices", "pair by pair", "prompt once, KV cache per choice", "speed-up",
                  "max abs. score difference", "accuracy (pairwise / shared)"], rows)



def eval_order(d):
    rows = [[r["task"], f"{r['examples']} × {r['choices']}", f"{r['mean_prompt_tokens']:.0f}",
             f"{r['file_order_s']:.1f} s (×{r['padded_share_file_order']:.2f})",
             f"{r['longest_first_s']:.1f} s (×{r['padded_share_longest_first']:.2f})", f"**{r['speedup']:.2f}×**",
             f"{r['max_abs_score_diff']:.1e}", f"{r['accuracy_file_order']:.4f} / {r['accuracy_longest_first']:.4f}",
             str(r["repeats"])] for r in d["rows"]]
    return table(["task", "examples × choices", "mean prompt tokens", "file order (padded tokens / tokens)",
                  "longest first (padded tokens / tokens)", "speed-up", "max abs. score difference",
                  "accuracy (file order / longest first)", "runs an arm (fastest kept)"], rows)


def nf4_cpu_path(d):
    rows = [[r["task"], r["model"], str(r["examples"]), str(r["threads"]), "yes" if r["cpu_has_avx512bf16"] else "no",
             f"{r['bnb_bf16_kernel_s']:.1f} s", f"{r['dequantise_fp32_s']:.1f} s", f"**{r['time_ratio']:.2f}**",
             f"{r['accuracy_bnb_bf16_kernel']:.3f} / {r['accuracy_dequantise_fp32']:.3f}",
             f"{r['max_abs_score_diff']:.1e}"] for r in d["rows"]]
    return table(["task", "NF4 model", "examples", "threads", "CPU has AVX512-BF16", "bitsandbytes' bf16 kernel",
                  "dequantise, fp32 (floe-dist)", "time ratio (fp32 / kernel)", "accuracy (kernel / fp32)",
                  "max abs. choice-score difference"], rows)


def tokenize_rows(d):
    rows = [[r["task"], f"{r['examples']:,}", f"{r['tokens']:,}", f"{r['encode_epoch_s']:.2f} s",
             f"{r['tokenize_cold_s']:.2f} s", f"{r['tokenize_cached_s']:.3f} s",
             f"{r['draw_100_encode_s']:.2f} s / {r['draw_100_cached_s']:.2f} s",
             f"{r['examples']:,} → {r['rows_packed']:,}", f"{pct(r['padding_unpacked'])} → {pct(r['padding_packed'])}"]
            for r in d["rows"]]
    return table(["task (train split)", "examples", "tokens", "encode one epoch (per rank, before)",
                  "tokenise once (cold)", "read the cache", "100 batches of 8: encode / cached",
                  "rows: unpacked → packed", "padding: unpacked → packed"], rows)


def mean_std_pct(values) -> str:
    from statistics import mean, stdev

    return f"{100 * mean(values):.1f} ± {100 * (stdev(values) if len(values) > 1 else 0):.1f}%"


def campaign_vs_peft(d):
    packed = "peft_packed" in d["rows"][0]  # bench_campaign_vs_peft.py --peft-packed
    rows = []
    for r in d["rows"]:
        c, p = r["campaign"], r["peft"]
        choice = c["searched_allocation"] or f"{c.get('method', '–')} (no search)"
        rows.append([r["seed"], f"{100 * c['accuracy']:.1f}%", f"{c['wall_s']:.0f} s",
                     f"{choice}, r={c['rank']}, lr {c['lr']:.1e}, {c['train_steps']} steps",
                     f"{c['trainable_parameters']:,}", f"{100 * p['accuracy']:.1f}%", f"{p['wall_s']:.0f} s",
                     f"{p['train_steps']}", f"{p['trainable_parameters']:,}"]
                    + ([f"{100 * r['peft_packed']['accuracy']:.1f}%", f"{r['peft_packed']['train_steps']}"]
                       if packed else []))
    if len(d["rows"]) > 1:
        from statistics import mean

        def over_seeds(arm, key):
            return [r[arm][key] for r in d["rows"]]

        rows.append(["**mean ± std**", f"**{mean_std_pct(over_seeds('campaign', 'accuracy'))}**",
                     f"{mean(over_seeds('campaign', 'wall_s')):.0f} s", "", "",
                     f"**{mean_std_pct(over_seeds('peft', 'accuracy'))}**",
                     f"{mean(over_seeds('peft', 'wall_s')):.0f} s", "", ""]
                    + ([f"**{mean_std_pct(over_seeds('peft_packed', 'accuracy'))}**", ""] if packed else []))
    reused = "steps_reused" in d["rows"][0]["campaign"]  # recorded since the final run continues the search's
    stages = table(["seed", "seconds per stage", "search: trials, overhead share, top-budget origins"
                    + (", final steps continued from the search" if reused else ""),
                    "candidates' best validation cost"],
                   [[r["seed"], ", ".join(f"{k} {v:.0f}" for k, v in r["campaign"]["stage_seconds"].items()),
                     "no search" if r["campaign"]["search_overhead_share"] is None else
                     f"{r['campaign']['search_trials']}, {r['campaign']['search_overhead_share']:.0%}, "
                     f"{r['campaign']['top_budget_origins']}"
                     + (f", {r['campaign']['steps_reused']}" if reused else ""),
                     ", ".join(f"{n} {'–' if c['best_cost'] is None else format(c['best_cost'], '.4f')}"
                               for n, c in (r["campaign"]["candidates"] or {}).items())] for r in d["rows"]])
    return table(["seed", "campaign accuracy", "campaign wall", "campaign's choice", "campaign params",
                  "PEFT LoRA accuracy", "PEFT wall", "PEFT steps", "PEFT params"]
                 + (["PEFT LoRA on packed rows", "its steps"] if packed else []), rows) + "\n\n" + stages


def adapter_targets(d):
    """Per arm and seed: the budgeted campaign's validation accuracy, its choice and final steps; then each arm's
    mean over its seeds."""
    from statistics import mean

    of: dict[str, list[dict]] = {}  # arm ("targets" in the rows) -> its rows, in the file's order of arms
    for r in d["rows"]:
        of.setdefault(r["targets"], []).append(r)
    per_run = [[arm, r["seed"], f"{100 * c['accuracy']:.1f}%", f"r={c['rank']}, lr {c['lr']:.1e}",
                str(c["train_steps"]), f"{c['stage_seconds']['train'] / max(1, c['train_steps']):.2f} s",
                f"{c['trainable_parameters']:,}", f"{c['wall_s']:.0f} s"]
               for arm, rows in of.items() for r in rows for c in [r["campaign"]]]
    means = [[f"**{arm}**", "mean", f"**{mean_std_pct([r['campaign']['accuracy'] for r in rows])}**", "",
              f"{mean(r['campaign']['train_steps'] for r in rows):.0f}", "", "", ""] for arm, rows in of.items()]
    return table(["arm", "seed", "validation accuracy", "search's choice", "final steps",
                  "train stage seconds per final step", "adapter params", "campaign wall"], per_run + means)


def search_pays(d):
    """Per task and seed: the searched campaign's accuracy, choice and final steps beside the unsearched one's; then
    per task each arm's mean and the paired difference with its standard error."""
    from statistics import mean, stdev

    of: dict[tuple[str, int], dict[str, dict]] = {}  # (task, seed) -> arm -> its campaign, in the file's order
    for r in d["rows"]:
        of.setdefault((r["task"], r["seed"]), {})[r["arm"]] = r["campaign"]
    rows, by_task = [], {}
    for (task, seed), arms in of.items():
        s, n = arms.get("searched"), arms.get("no search")
        rows.append([task, seed] + [f"{100 * s['accuracy']:.1f}%", f"r={s['rank']}, lr {s['lr']:.1e}",
                                    f"{s['train_steps']} ({s['steps_reused']} the search's)",
                                    f"{s['stage_seconds'].get('search', 0):.0f} s", f"{s['wall_s']:.0f} s"]
                    + [f"{100 * n['accuracy']:.1f}%", str(n["train_steps"]), f"{n['wall_s']:.0f} s"]
                    + [f"{100 * (s['accuracy'] - n['accuracy']):+.1f}"])
        by_task.setdefault(task, []).append((s, n))
    for task, pairs in by_task.items():
        diffs = [100 * (s["accuracy"] - n["accuracy"]) for s, n in pairs]
        se = stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        rows.append([f"**{task}**", "mean", f"**{mean_std_pct([s['accuracy'] for s, _ in pairs])}**", "",
                     f"{mean(s['train_steps'] for s, _ in pairs):.0f}", "", "",
                     f"**{mean_std_pct([n['accuracy'] for _, n in pairs])}**",
                     f"{mean(n['train_steps'] for _, n in pairs):.0f}", "",
                     f"**{mean(diffs):+.1f}** (s.e. {se:.1f})"])
    return table(["task", "seed", "searched: accuracy", "its choice", "final steps", "search stage", "wall",
                  "no search: accuracy", "final steps", "wall", "searched − no search (points)"], rows)


def search_fidelity(d):
    """Per seed and configuration: the search's validation cost at each trial length, and the long run's test
    accuracy; then, per seed, the configuration each length would choose."""
    from statistics import mean

    budgets = d["rows"][0]["budgets"]
    rows = [[r["seed"], c["allocation"], c["rank"],
             *(f"{c[f'cost_{b}']:.4f} ({pct(c[f'val_accuracy_{b}'], 0)})" for b in budgets),
             pct(c["test_accuracy"])] for r in d["rows"] for c in r["configs"]]
    per_config = table(["seed", "allocation", "rank", *(f"validation cost (accuracy), {b} steps" for b in budgets),
                        f"test accuracy, {budgets[-1]} steps"], rows)

    def name(c):
        return f"{c['allocation']} r={c['rank']}"

    picks = [[r["seed"], *(name(min(r["configs"], key=lambda c: c[f"cost_{b}"])) for b in budgets),
              name(max(r["configs"], key=lambda c: c["test_accuracy"]))] for r in d["rows"]]
    chosen = table(["seed", *(f"lowest cost at {b} steps" for b in budgets), "best test accuracy"], picks)
    configs = [name(c) for c in d["rows"][0]["configs"]]

    def over_seeds(n, key):
        return [c[key] for r in d["rows"] for c in r["configs"] if name(c) == n]

    means = table(["configuration", *(f"mean validation cost, {b} steps" for b in budgets),
                   f"test accuracy after {budgets[-1]} steps, mean ± std over seeds"],
                  [[n, *(f"{mean(over_seeds(n, f'cost_{b}')):.4f}" for b in budgets),
                    mean_std_pct(over_seeds(n, "test_accuracy"))] for n in configs])
    return per_config + "\n\n" + chosen + "\n\n" + means


def rank_agreement(d):
    """Kendall's tau-b (scipy) between each short rung's ordering of the configurations and the long run's, both on
    the validation examples: by validation cost (cross-entropy, the default objective) and by validation accuracy
    (the error objective), against the validation accuracy after the last length. No test split is used."""
    from statistics import mean

    from scipy.stats import kendalltau

    *rungs, final = d["rows"][0]["budgets"]

    def tau(r, key):
        outcome = [c[f"val_accuracy_{final}"] for c in r["configs"]]
        ordering = [-c[key] if key.startswith("cost") else c[key] for c in r["configs"]]  # higher is better
        return float(kendalltau(ordering, outcome).statistic)

    keys = [k for b in rungs for k in (f"cost_{b}", f"val_accuracy_{b}")]
    rows = [[r["seed"], *(f"{tau(r, k):+.2f}" for k in keys)] for r in d["rows"]]
    rows.append(["**mean**", *(f"**{mean(tau(r, k) for r in d['rows']):+.2f}**" for k in keys)])
    return table(["seed", *(f"tau, {'cost' if k.startswith('cost') else 'accuracy'} at {k.rsplit('_', 1)[1]} steps"
                            for k in keys)], rows)


def prefix_agreement(d):
    """bench_rank_agreement.py: Kendall's tau-b (scipy) between each rung's ordering of the six configurations and
    the final runs' validation accuracy, per objective (validation cost or accuracy on the trials' examples) and
    trial kind (the final run's prefix, or a whole run of the rung's length with its cooldown); what each rung's
    pick scores after the final run against the best configuration; and the configurations' means."""
    from statistics import mean

    from scipy.stats import kendalltau

    *rungs, final = d["rows"][0]["budgets"]
    outcome = f"val_accuracy_{final}"
    kinds = [(f"{kind}{what}_{b}", f"{'cooled' if kind else 'prefix'} {what.replace('val_', '')}, {b} steps")
             for b in rungs for kind in ("", "cooled_") for what in ("cost", "val_accuracy")]
    kinds.append((f"cost_{final}", f"trials' own cost after {final} steps"))

    def score(c, key):  # higher is better
        return -c[key] if "cost" in key else c[key]

    def tau(r, key):
        return float(kendalltau([score(c, key) for c in r["configs"]], [c[outcome] for c in r["configs"]]).statistic)

    def regret(r, key):  # the pick's outcome below the best outcome, in points (first of the ties)
        pick = max(r["configs"], key=lambda c: score(c, key))
        return 100 * (max(c[outcome] for c in r["configs"]) - pick[outcome])

    rows = [[r["seed"], *(f"{tau(r, k):+.2f}" for k, _ in kinds)] for r in d["rows"]]
    rows.append(["**mean**", *(f"**{mean(tau(r, k) for r in d['rows']):+.2f}**" for k, _ in kinds)])
    agreement = table(["seed", *(f"tau, {label}" for _, label in kinds)], rows)
    rows = [[r["seed"], *(f"{regret(r, k):.1f}" for k, _ in kinds)] for r in d["rows"]]
    rows.append(["**mean**", *(f"**{mean(regret(r, k) for r in d['rows']):.1f}**" for k, _ in kinds)])
    picks = table(["seed", *(f"points lost, picking by {label}" for _, label in kinds)], rows)

    def name(c):
        return f"r={c['rank']}, lr {c['lr']:.1e}"

    names = list(dict.fromkeys(name(c) for c in d["rows"][0]["configs"]))

    def over_seeds(n, key):
        return [c[key] for r in d["rows"] for c in r["configs"] if name(c) == n]

    scored = d["rows"][0]["configs"][0]["outcome_examples"]  # what the split holds, at most the limit asked for
    means = table(["configuration", *(f"cost, {b} steps (prefix / cooled)" for b in rungs),
                   f"validation accuracy after {final} steps ({scored} examples), mean ± std"],
                  [[n, *(f"{mean(over_seeds(n, f'cost_{b}')):.4f} / {mean(over_seeds(n, f'cooled_cost_{b}')):.4f}"
                         for b in rungs), mean_std_pct(over_seeds(n, outcome))] for n in names])
    return agreement + "\n\n" + picks + "\n\n" + means


def expert_parallel(d):
    step = table(["micro-batch", "ep1 step", "ep2 step", "ratio ep2/ep1 (goal ≤ 1.3)", "max loss difference"],
                 [[f"{r['micro_batch']}{dagger(r)}", f"{r['ep1_step_s']:.3f} s", f"{r['ep2_step_s']:.3f} s",
                   f"**{r['ratio']:.3f}**",
                   f"{r['max_loss_diff']:.1e}"] for r in d["rows"]])
    state = table(["layout", "held on rank 0", f"share of a full replica ({d['replica_mib']:.2f} MiB)"],
                  [[r["layout"], f"{r['held_mib']:.2f} MiB", f"{r['share']:.3f}"] for r in d["state"]])
    return step + "\n\nPer-rank adapter state on rank 0:\n\n" + state


def plan_published(kind):
    def render(d):
        rows = [[r["run"], r["source"], f"{r['published']:g} {r['unit']}", f"{r['plan']:.2f} {r['unit']}",
                 f"**{r['error']:+.1%}**", f"{r['plan_load']:.2f} {r['unit']}", ("within ±15%" if abs(r["error"]) <= 0.15 else "**missed** (outside ±15%)")
                 if kind == "validation" else r["fitted"]] for r in d["rows"] if r["role"] == kind]
        last = "against ±15%" if kind == "validation" else "constant fitted on it"
        return table(["run", "source", "published", "plan", "error", "plan: load peak", last], rows)
    return render


def plan_cpu(d):
    def cell(r, k):
        return f"{r[k + '_mib']:,} ({r[k + '_err']:+.1f}%)"
    rows = [[r["run"] + dagger(r), f"{r['plan_mib']:,}", cell(r, "glibc"), cell(r, "pinned"), cell(r, "jemalloc")]
            for r in d["rows"]]
    return table(["run", "plan (MiB)", "glibc malloc", "glibc, `MALLOC_MMAP_THRESHOLD_=131072`",
                  "jemalloc (`LD_PRELOAD`)"],
                 rows)


def backbone_load(d):
    def goal(r, key=""):
        if r["ranks"] == 1:
            return "(a baseline)"
        if r.get(f"goal{key}_mib") is None:
            return "–"
        return f"{r[f'goal{key}_mib']:,} → **{'met' if r[f'meets_goal{key}'] else 'missed'}**"

    def planned(r):
        if "plan_load_mib" not in r:
            return "–"
        return f"{r['plan_load_mib']:,} ({(r['plan_load_mib'] / r['load_mib'] - 1) * 100:+.0f}%)"

    rows = [[r["path"], r["ranks"], f"{r['load_mib']:,}", goal(r), goal(r, "_model_only"), planned(r),
             f"{r['step_mib']:,}"] for r in d["rows"]]
    return table(["path", "ranks", "load peak per rank (MiB)", "goal (1/N + 0.15) × from_pretrained peak",
                  "goal (1/N + 0.15) × module-by-module peak", "`plan --device cpu` load (error)",
                  "peak through the first step (MiB)"], rows)


def chat_turns(d):
    def mean(values):
        return sum(values) / len(values)

    rows, arms = [], {}
    for r in d["rows"]:
        arms.setdefault(r["arm"], []).append(r)
    for arm, runs in arms.items():
        per_seed = lambda key: " / ".join(f"{100 * r[key]:.0f}" for r in runs)  # noqa: E731
        numeric = pct(mean([r["numeric_match"] for r in runs]))
        rows.append([arm, runs[0]["steps"], per_seed("numeric_match"), f"**{numeric}**", per_seed("exact_match"),
                     f"{mean([r['loss'] for r in runs]):.3f}", f"{mean([r['train_s'] for r in runs]):.0f} s"])
    return (table(["arm", "train steps", "numeric match % per seed", "numeric match (mean)", "exact match % per seed",
                   "last-turn answer loss (mean)", "training wall (mean)"], rows)
            + f"\n\n{d['conversations']} conversations of {d['turns']} questions; scored on the last turn of the first "
              f"{d['rows'][0]['examples']} test conversations.")


def packing(d):
    rows = [[r["arm"], r["steps"], f"{r['trained_examples']:,}", f"{r['trained_tokens']:,}", f"{r['train_s']:.0f} s",
             f"**{r['tokens_per_s']:.0f}**", f"{r['loss']:.3f}", pct(r["numeric_match"]), pct(r["exact_match"])]
            for r in d["rows"]]
    return (table(["arm", "train steps", "examples trained", "tokens trained (no padding)", "train stage wall",
                   "tokens / s", "last-turn answer loss", "numeric match", "exact match"], rows)
            + f"\n\nSeed {d['rows'][0]['seed']}, one run per arm; {d['conversations']} conversations; scored on the "
              f"last turn of the first {d['rows'][0]['examples']} test conversations.")


def peft_grid(d):
    from statistics import mean

    seeds = sorted({r["seed"] for r in d["rows"]})
    points = sorted({(r["rank"], r["lr"]) for r in d["rows"]})
    at = {(r["seed"], r["rank"], r["lr"]): r for r in d["rows"]}
    complete = [pt for pt in points if all((s, *pt) in at for s in seeds)]
    rows = [[f"PEFT r={rank}, lr {lr:.0e}", " / ".join(pct(at[s, rank, lr]["accuracy"]) for s in seeds),
             mean_std_pct([at[s, rank, lr]["accuracy"] for s in seeds]),
             f"{mean(at[s, rank, lr]['wall_s'] for s in seeds):.0f} s"] for rank, lr in complete]
    best = max(complete, key=lambda pt: mean(at[(s, *pt)]["accuracy"] for s in seeds))
    campaign = {s: next(r for r in d["rows"] if r["seed"] == s) for s in seeds}
    rows.append([f"**grid's best on the test split (oracle): r={best[0]}, lr {best[1]:.0e}**", "",
                 f"**{mean_std_pct([at[(s, *best)]['accuracy'] for s in seeds])}**", ""])
    rows.append([f"**the campaign (`{d['rows'][0]['campaign_file']}`: its final run of these steps)**",
                 " / ".join(pct(campaign[s]["campaign_accuracy"]) for s in seeds),
                 f"**{mean_std_pct([campaign[s]['campaign_accuracy'] for s in seeds])}**",
                 f"{mean(campaign[s]['campaign_wall_s'] for s in seeds):.0f} s"])
    steps = ", ".join(f"seed {s}: {at[(s, *complete[0])]['train_steps']}" for s in seeds)
    return (table(["arm", "score per seed", "mean ± std", "wall (mean)"], rows)
            + f"\n\nSteps per seed (the campaign's final run): {steps}. Seeds: {', '.join(map(str, seeds))}.")


def streaming(d):
    by = {(r["form"], r["rows"], r["mode"]): r for r in d["rows"]}
    rows = [[form, f"{n:,}", f"{by[form, n, 'whole']['above_baseline_mib']:.0f} MiB",
             f"**{by[form, n, 'streamed']['above_baseline_mib']:.0f} MiB**",
             f"{by[form, n, 'streamed']['first_steps_s']:.2f} s",
             f"{by[form, n, 'streamed']['resume_at_step']:,}: {by[form, n, 'streamed']['resume_s']:.1f} s"]
            for form, n, mode in by if mode == "whole"]
    return table(["corpus", "rows", "read whole: peak above baseline", "streamed: peak above baseline",
                  "streamed: 50 steps of 8 rows (rank 0 of 2)", "streamed: resume at step (read up to it)"], rows)


def lm_eval_agreement(d):
    rows = [[r["examples"], pct(r["floe_dist_accuracy"]), pct(r["lm_eval_accuracy"]), f"{r['seconds']} s"]
            for r in d["rows"]]
    return table(["SST-2 test examples", "floe-dist evaluate accuracy", "lm-eval accuracy (its hf model)",
                  "both, one process"], rows) + f"\n\nAdapter: `{d['adapter']}`."


def compare_allocators(d):
    rows = [[r["method"], mean_std(r), seeds(r["per_seed"]), f"{r['layers']:.1f}", f"{r['trainable']:,}",
             f"{r['active']:,}", r["allocation_s"], r["training_s"]] for r in d["rows"]]
    n = len(d["rows"][0]["per_seed"])
    return (f"Budget {d['budget']:,} trainable parameters, {d['steps']} steps × {d['micro_batch']}.\n\n"
            + table(["method", f"accuracy % (mean ± std, {n} seeds)", "per seed", "layers", "trainable params",
                     "active params / token", "allocation s", "training s"], rows))


def planted_c6(d):
    def ints(v):
        return ", ".join(map(str, v))
    return table(["seed", "experts per block (searched)", "argmax at init", "E_3 > E_5 ≥ others", "MSE searched",
                  "MSE uniform"],
                 [[r["seed"], ints(r["experts"]), ints(r["argmax_init"]), "yes" if r["claim_holds"] else "no",
                   f"{r['mse_searched']:.4f} ({r['params_searched']:,})",
                   f"{r['mse_uniform']:.4f} ({r['params_uniform']:,})"]
                  for r in d["c6"]])


def planted_c7(d):
    return table(["schedule", "val MSE per seed", "mean", "trainable", "active / token"],
                 [[r["schedule"], ", ".join(f"{v:.4f}" for v in r["val_mse"]), f"{r['mean']:.4f}",
                   f"{r['trainable']:,}",
                   f"{r['active']:,}"] for r in d["c7"]])


def fisher_toy(d):
    rows = [[r["score"], ", ".join(f"{p:.2f}" for p in r["precision_per_seed"]), f"**{r['precision_mean']:.2f}**",
             ", ".join(str(t) for t in r["top_per_seed"])] for r in d["rows"]]
    return (table(["layer score", "precision@2 per seed", "mean", "top-2 per seed"], rows)
            + f"\n\nChance (random 2 of {d['blocks']} blocks, 2 planted): precision@2 = {d['chance']:.2f} "
              "in expectation.")


def flexora_toy(d):
    rows = [[r["seed"], r["flexora_layers"], f"{r['mse_flexora']:.3f}", f"{r['mse_all']:.3f}", r["random_layers"],
             f"{r['mse_random']:.3f}"] for r in d["rows"]]
    m, w, n = d["mean"], d["wins"], len(d["rows"])
    return (table(["seed", "Flexora layers", "MSE Flexora", "MSE all 8 layers", "random layers (same count)",
                   "MSE random"], rows)
            + f"\n\nMean MSE: Flexora {m['mse_flexora']:.3f}, all layers {m['mse_all']:.3f}, random "
              f"{m['mse_random']:.3f}. Flexora lower than all layers on {w['over_all']} of {n} seeds, lower than "
              f"random layers of the same count on {w['over_random']} of {n}.")


def gpu_throughput(d):
    rows = [[r["call"], r["shape"], r["variant"], r.get("alloc_conf") or "default",
             f"{r['micro_batch']} × {r['seq_len']}", f"{r['trainable']:,}",
             f"{r['step_seconds']:.3f}", f"{r['tokens_per_s']:,.0f}", f"**{pct(r['mfu'])}**", pct(r["hfu"]),
             pct(r["mfu_6n_before"]) if "mfu_6n_before" in r else "–", num(r["peak_allocated_gib"], ".2f"),
             num(r["plan_over_alloc_context"], ".2f"), num(r["reserved_context_gib"], ".2f"),
             num(r["step_vs_peft"], ".2f"), num(r.get("step_vs_peft_same_layers"), ".2f")]
            for r in d["rows"]]
    return table(["call", "shape", "variant", "allocator", "b × s", "trainable", "step s", "tokens/s", "MFU",
                  "HFU",
                  "published before (6N)", "peak alloc GiB", "plan / (alloc + ctx)", "reserved + ctx GiB",
                  "step vs PEFT, all layers (equal params)", "step vs PEFT, same layers"], rows)


def task_arms(recipe):
    """Per recipe: each arm's accuracy per seed, then mean ± std, wall time and trainable parameters."""
    def render(d):
        from statistics import mean, stdev

        arms = ("zero_shot", "peft", "uniform", "campaign")
        names = {"zero_shot": "zero-shot", "peft": "PEFT LoRA q,v r=8, all layers (PEFT itself)",
                 "uniform": "floe-dist uniform LoRA (same adapter, data, steps)", "campaign": "floe-dist campaign"}
        rows_in = sorted((r for r in d["rows"] if r["recipe"] == recipe), key=lambda r: r["seed"])
        rows = []
        for arm in arms:
            acc = [r[arm]["accuracy"] for r in rows_in]
            spread = f" ± {100 * stdev(acc):.1f}" if len(acc) > 1 else ""
            wall = mean(r[arm]["wall_s"] for r in rows_in)
            params = {r[arm].get("trainable_parameters", 0) for r in rows_in}
            steps = {r[arm].get("train_steps", 0) for r in rows_in}
            rows.append([names[arm], " / ".join(f"{100 * a:.1f}" for a in acc), f"**{100 * mean(acc):.1f}{spread}%**",
                         f"{wall:.0f} s", " / ".join(f"{p:,}" for p in sorted(params)),
                         " / ".join(str(s) for s in sorted(steps))])
        choices = "; ".join(f"seed {r['seed']}: {c['searched_allocation'] or '–'}, r={c['rank']}, lr {c['lr']:.1e}"
                            for r in rows_in for c in [r["campaign"]])
        return (table(["arm", "score per seed", "mean ± std", "wall (mean)", "trainable parameters", "train steps"],
                      rows) + f"\n\nThe campaign's choices: {choices}.")
    return render


def lora_moe_layer(d):
    """Fused columns are '–' in rows measured before the fused router, and `fused, 3 graphs` in rows measured
    before routing and broadcast were merged into one graph (those rows' fused columns are the three graphs)."""
    ms = ("base_ms", "router_ms", "floe_ms", "router_fused_ms", "floe_fused_ms", "fused_three_graphs_ms", "gather_ms",
          "loop_ms", "lora_ms")
    rows = [[r["call"], r["shape"], f"{r.get('tokens', d.get('tokens')):,}", *(num(r.get(k), ".3f") for k in ms),
             f"**{r['floe_over_lora']:.2f}**",
             f"**{num(r.get('floe_fused_over_lora'), '.2f')}**", f"{r['loop_over_floe']:.2f}",
             f"{r['gather_over_floe']:.2f}", f"{r['floe_rerun_ms']:.3f}",
             "yes" if r.get("balance_in_backward") else "no"]
            for r in d["rows"]]
    return table(["call", "shape", "tokens", "base", "+router", "floe-dist", "+router fused", "floe-dist fused",
                  "fused, 3 graphs", "gather", "loop", "lora", "floe-dist / lora (same layer)",
                  "floe-dist fused / lora", "loop / floe-dist", "gather / floe-dist", "product path rerun",
                  "balance loss in floe-dist's backward"], rows)


def train_step(d):
    return table(["arm (q_proj + v_proj, every layer)", "trainable parameters",
                  "seconds per step (mean ± std of rounds)", "per round", "vs PEFT's loop"],
                 [[r["arm"], f"{r['trainable_parameters']:,}", f"{r['seconds_per_step']:.3f} ± {r['spread']:.3f}",
                   ", ".join(f"{s:.3f}" for s in r["per_round"]), f"**{r['vs_peft']:.3f}×**"] for r in d["rows"]])


def forked_stages(d):
    labels = {"fresh": "fresh interpreters (`FLOE_DIST_FORK=0`: torchrun groups, started workers)",
              "forked": "forked from the campaign's zygote (the default)"}
    stages = list(d["rows"][0]["stage_seconds"])
    return table(["local processes", "campaign wall per run", "mean", *(f"{s} (mean s)" for s in stages)],
                 [[labels[r["arm"]], ", ".join(f"{w:.1f} s" for w in r["wall_s"]), f"**{r['mean_wall_s']:.1f} s**",
                   *(f"{r['stage_seconds'][s]:.1f}" for s in stages)] for r in d["rows"]])


# table name -> (result file, renderer)
TABLES = {
    "foundation": ("foundation", foundation),
    "campaign": ("campaign", campaign),
    "campaign-arithmetic": ("campaign_smollm2-arithmetic", campaign),
    "floe-layers-sst2": ("floe_layers_sst2", floe_layers),
    "floe-layers-boolq": ("floe_layers_boolq", floe_layers),
    "fisher-toy": ("fisher_toy", fisher_toy),
    "flexora-toy": ("flexora_toy", flexora_toy),
    "search-throughput": ("search_throughput", search_throughput),
    "search-compute": ("search_compute", search_compute),
    "expert-parallel": ("expert_parallel", expert_parallel),
    "search-workers": ("search_workers_smollm2", search_workers),
    "search-workers-12": ("search_workers_12", search_workers),
    "search-methods": ("search_methods", search_methods),
    "search-methods-calibration": ("search_methods_calibration", search_methods),
    "search-methods-smollm2": ("search_methods_smollm2", search_methods),
    "search-methods-seeds200": ("search_methods_seeds200", search_methods),
    "search-methods-calibration-distinct": ("search_methods_calibration_distinct", search_methods),
    "search-methods-calibration-min": ("search_methods_calibration_min", search_methods),
    "search-methods-seeds200-distinct": ("search_methods_seeds200_distinct", search_methods),
    "search-methods-seeds200-cap": ("search_methods_seeds200_cap", search_methods),
    "search-methods-calibration-lie": ("search_methods_calibration_lie", search_methods),
    "search-methods-seeds200-lie": ("search_methods_seeds200_lie", search_methods),
    "search-methods-smollm2-lie": ("search_methods_smollm2_lie", search_methods),
    "search-methods-calibration-settled": ("search_methods_calibration_settled", search_methods),
    "search-methods-seeds200-settled": ("search_methods_seeds200_settled", search_methods),
    "search-methods-smollm2-settled": ("search_methods_smollm2_settled", search_methods),
    "search-methods-calibration-pooled": ("search_methods_calibration_pooled", search_methods),
    "search-methods-seeds200-pooled": ("search_methods_seeds200_pooled", search_methods),
    "search-methods-seeds300-cap30-smac": ("search_methods_seeds300_cap30_bohb-rule", search_methods),
    "search-methods-seeds300-cap30-random": ("search_methods_seeds300_cap30_random", search_methods),
    "search-methods-seeds400-cap30-smac": ("search_methods_seeds400_cap30_bohb-rule", search_methods),
    "search-methods-seeds400-cap30-random": ("search_methods_seeds400_cap30_random", search_methods),
    "eval-choice-scoring": ("eval_choice_scoring", eval_choice_scoring),
    "eval-order": ("eval_order", eval_order),
    "tokenize": ("tokenize", tokenize_rows),
    "nf4-cpu-path": ("nf4_cpu_path", nf4_cpu_path),
    "campaign-vs-peft": ("campaign_vs_peft", campaign_vs_peft),
    "adapter-targets": ("adapter_targets", adapter_targets),
    "search-pays": ("search_pays", search_pays),
    "campaign-vs-peft-rungs": ("campaign_vs_peft_rungs", campaign_vs_peft),
    "campaign-vs-peft-now": ("campaign_vs_peft_now", campaign_vs_peft),
    "campaign-vs-peft-arithmetic": ("campaign_vs_peft_arithmetic", campaign_vs_peft),
    "campaign-vs-peft-arithmetic-320": ("campaign_vs_peft_arithmetic_320", campaign_vs_peft),
    "campaign-vs-peft-sst2-400": ("campaign_vs_peft_sst2_400", campaign_vs_peft),
    "campaign-vs-peft-uniform-400": ("campaign_vs_peft_uniform_400", campaign_vs_peft),
    "campaign-vs-peft-uniform-nosearch": ("campaign_vs_peft_uniform_nosearch", campaign_vs_peft),
    "campaign-vs-peft-hyperband": ("campaign_vs_peft_hyperband", campaign_vs_peft),
    "campaign-vs-peft-arithmetic-budget": ("campaign_vs_peft_arithmetic_budget", campaign_vs_peft),
    "campaign-vs-peft-arithmetic-lean": ("campaign_vs_peft_arithmetic_lean", campaign_vs_peft),
    "campaign-vs-peft-arithmetic-3x": ("campaign_vs_peft_arithmetic_3x", campaign_vs_peft),
    "campaign-vs-peft-arithmetic-packed": ("campaign_vs_peft_arithmetic_packed", campaign_vs_peft),
    "campaign-vs-peft-arithmetic-packed-3x": ("campaign_vs_peft_arithmetic_packed_3x", campaign_vs_peft),
    "campaign-vs-peft-arithmetic-budget-fresh": ("campaign_vs_peft_arithmetic_budget_fresh", campaign_vs_peft),
    "campaign-vs-peft-arithmetic-budget-halving": ("campaign_vs_peft_arithmetic_budget_halving", campaign_vs_peft),
    "campaign-vs-peft-sst2-budget": ("campaign_vs_peft_sst2_budget", campaign_vs_peft),
    "campaign-vs-peft-chat-budget": ("campaign_vs_peft_chat_budget", campaign_vs_peft),
    "campaign-vs-peft-chat-3x": ("campaign_vs_peft_chat_3x", campaign_vs_peft),
    "campaign-vs-peft-sst2-spare": ("campaign_vs_peft_sst2_spare", campaign_vs_peft),
    "campaign-vs-peft-sst2-3x": ("campaign_vs_peft_sst2_3x", campaign_vs_peft),
    "campaign-vs-peft-siqa": ("campaign_vs_peft_siqa", campaign_vs_peft),
    "campaign-vs-peft-boolq": ("campaign_vs_peft_boolq", campaign_vs_peft),
    "campaign-vs-peft-chat-budget-probe5": ("campaign_vs_peft_chat_budget_probe5", campaign_vs_peft),
    "search-fidelity": ("search_fidelity", search_fidelity),
    "search-fidelity-agreement": ("search_fidelity", rank_agreement),
    "rank-agreement": ("rank_agreement", prefix_agreement),
    "rank-agreement-sst2": ("rank_agreement_sst2", prefix_agreement),
    "search-fidelity-100": ("search_fidelity_100", search_fidelity),
    "task-arms-arithmetic": ("task_arms", task_arms("smollm2-arithmetic")),
    "task-arms-sst2": ("task_arms", task_arms("smollm2-sst2")),
    "plan-calibration": ("plan_published", plan_published("calibration")),
    "plan-validation": ("plan_published", plan_published("validation")),
    "plan-cpu": ("plan_cpu", plan_cpu),
    "compare-allocators-sst2": ("compare_allocators_sst2", compare_allocators),
    "load": ("load", backbone_load),
    "chat-turns": ("chat_turns", chat_turns),
    "packing": ("packing", packing),
    "streaming": ("streaming", streaming),
    "peft-grid": ("peft_grid", peft_grid),
    "peft-grid-packed": ("peft_grid_packed", peft_grid),
    "lm-eval-agreement": ("lm_eval_agreement", lm_eval_agreement),
    "planted-c6": ("planted_toys", planted_c6),
    "planted-c7": ("planted_toys", planted_c7),
    "gpu-throughput": ("gpu_throughput", gpu_throughput),
    "lora-moe-layer": ("lora_moe_layer", lora_moe_layer),
    "lora-moe-layer-cpu": ("lora_moe_layer_cpu", lora_moe_layer),
    "forked-stages": ("forked_stages", forked_stages),
    "train-step": ("train_step", train_step),
    "campaign-repeat-sst2": ("campaign_sst2_budget600", campaign_repeat),
    "campaign-repeat-sst2-500": ("campaign_sst2_budget500", campaign_repeat),
    "campaign-budgets-sst2": ("campaign_sst2_small_budgets", campaign_repeat),
    "campaign-siqa-reserve": ("campaign_siqa_reserve", campaign_repeat),
    "campaign-siqa-stop": ("campaign_siqa_stop", campaign_repeat),
    "campaign-piqa-tokens": ("campaign_piqa_tokens", campaign_repeat),
    "campaign-budget400-stage-start": ("campaign_sst2_budget400_stage_start", campaign_repeat),
    "campaign-sst2-budget500-stop": ("campaign_sst2_budget500_stop", campaign_repeat),
    "campaign-sst2-budget500-yield": ("campaign_sst2_budget500_yield", campaign_repeat),
    "campaign-nq-stop": ("campaign_nq_stop", campaign_repeat),
    "campaign-nq-before": ("campaign_nq_before", campaign_repeat),
    "campaign-nq-probe": ("campaign_nq_probe", campaign_repeat),
    "campaign-nq-reserve": ("campaign_nq_probe", final_eval_reserve),
    "job-budget": ("job_budget", job_budget),
    "campaign-length-chat": ("campaign_chat_retimed", campaign_length),
    "campaign-spare-zero-shot-sst2": ("campaign_sst2_spare_zero_shot", campaign_repeat),
    "campaign-spare-zero-shot-arithmetic": ("campaign_arithmetic_spare_zero_shot", campaign_repeat),
    "campaign-spare-grace-arithmetic": ("campaign_arithmetic_spare_grace", campaign_repeat),
}


def render(name: str) -> str:
    if name not in TABLES:
        raise KeyError(f"BENCHMARKS.md names table {name!r}, which report.py does not know ({sorted(TABLES)})")
    file, renderer = TABLES[name]
    data = load(file)
    return f"{source(data, file)}\n\n{renderer(data)}\n"


def regenerate(text: str) -> str:
    return BLOCK.sub(lambda m: f"<!-- table: {m['name']} -->\n{render(m['name'])}<!-- /table -->", text)


def unmarked_tables(text: str) -> list[str]:
    """The header rows of markdown tables that sit outside any marked block."""
    lines = BLOCK.sub("", text).splitlines()
    return [head for head, rule in zip(lines, lines[1:]) if head.startswith("|") and rule.startswith("|---")]


PLOT = REPO / "docs" / "results.png"
PLOTTED = {"SST-2, 500 s budget (accuracy)": "campaign_vs_peft_sst2_spare",
           "arithmetic, 350 s budget (numeric match)": "campaign_vs_peft_arithmetic_packed",
           "chat, 300 s budget (numeric match)": "campaign_vs_peft_chat_budget"}
ARMS = {"campaign": "floe-dist campaign", "peft": "PEFT LoRA", "peft_packed": "PEFT LoRA, packed rows"}


def plot_results(path: Path = PLOT) -> Path:
    """README's one plot: per seed, the campaign's and PEFT LoRA's score at equal wall time, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(11, 3))
    for ax, (title, name) in zip(axes, PLOTTED.items()):
        rows = load(name)["rows"]
        seeds = [r["seed"] for r in rows]
        arms = [arm for arm in ARMS if arm in rows[0]]
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            ax.bar([s + (i - (len(arms) - 1) / 2) * width for s in seeds], [100 * r[arm]["accuracy"] for r in rows],
                   width=width, label=ARMS[arm], color=f"C{i}")
        low = min(100 * r[arm]["accuracy"] for r in rows for arm in arms)
        ax.set_ylim(max(0, low - 10), None)
        ax.set_xticks(seeds, [f"seed {s}" for s in seeds])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("%")
    for ax in axes:  # each panel names the arms it has
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("equal wall time, 3 seeds (BENCHMARKS.md)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a document differs from its result files")
    parser.add_argument("--plot", action="store_true", help=f"also redraw {PLOT.relative_to(REPO)}")
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot_results()}")
    failed = False
    for document in DOCUMENTS:
        failed |= refresh(document, check=args.check)
    return 1 if failed else 0


def refresh(document: Path, check: bool) -> bool:
    """Rewrite (or with check, compare) one document's tables; True if check found a difference."""
    label = document.relative_to(REPO)
    text = document.read_text()
    new = regenerate(text)
    stray = unmarked_tables(text)
    if check:
        stale = [m["name"] for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new)) if m["body"] != n["body"]]
        for name in stale:
            print(f"{label}: table {name!r} differs from its result file; run python benchmarks/report.py")
        for line in stray:
            print(f"{label}: a table outside any <!-- table: NAME --> block: {line[:80]}")
        return bool(stale or stray)
    document.write_text(new)
    print(f"rewrote {len(BLOCK.findall(new))} tables in {label}")
    for line in stray:
        print(f"warning: {label}: a table outside any marked block: {line[:80]}")
    return False

if __name__ == "__main__":
    sys.exit(main())
