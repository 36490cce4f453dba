"""Table 1 and the ablations (§7.3–7.6): every method with the same RL budget and seeds from one SFT model,
scored on the test split by judges no policy trained against, with 95 % bootstrap intervals and each
method's paired difference to No-RL, beside the paper's numbers; the reward diagnostic of the SFT model
(diagnose.py) comes first, because it predicts which rewards RL can climb.

    run_table1       the diagnostic, then every method × seed; results.json, claims.json, per_prompt.json,
                     results.md, results.png
    score_method     one method, one seed → <run>/table1/<method>-seed<k>/scores.json (means and per-prompt scores)
    bootstrap_ci     the percentile interval of a mean over seeds and prompts
    aggregate        seeds → mean, std, interval, paired difference to No-RL and its verdict
    claims           the paper's claims (CLAIMS) as paired differences between two methods
    table1_markdown  the paper's layout, the differences, the ablations and the reward-hacking indicators
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import evaluate
from baselines import METHODS, RewardModelConfig
from data import DATASETS, load_split
from data.tokenizer import tokenizer_for
from diagnose import diagnostic_markdown, run_diagnostic
from plots import plot_table1
from ppo import PPOConfig
from relevance import run_judge
from reward import RewardConfig, reward_for
from rl import run_rl
from rundir import CLIError, atomic_write, load_model
from runtime import machine
from sft import encode_pairs, perplexity

TABLE1_METHODS, ABLATION_METHODS = METHODS[:4] + ("hybrid",), ("cagsr",) + METHODS[4:7]
# §7.5, Table 1 (Instruction data set): relevance, ROUGE-L, human score (1–5)
PAPER_TABLE1 = {"no-rl": (0.72, 0.33, 3.2), "synthetic-pref": (0.78, 0.37, 3.5), "cagsr": (0.83, 0.39, 3.7),
                "human-pref": (0.87, 0.44, 4.0)}
# the default table1's RL budget per method and seed (flags override it): 7 methods × 3 seeds on the tiny
# preset fit in an hour on 2 CPU cores
BUDGET = {"iterations": 20, "batch_prompts": 32}
BOOTSTRAP_REPS, LEVEL = 2000, 0.95
LEARNED = {"synthetic-pref", "human-pref", "hybrid"}  # the methods that train a §7.3 reward model


def bootstrap_ci(a: np.ndarray, b: np.ndarray | None = None, reps: int = BOOTSTRAP_REPS, level: float = LEVEL,
                 seed: int = 0) -> list[float]:
    """Percentile interval of mean(a), or of mean(a) − mean(b), for scores a [seeds, prompts] (and b [seeds',
    prompts], the same prompts): each of `reps` resamples draws the prompts with replacement, the same
    draw for a and b (the difference is paired), and each method's seeds with replacement; the interval
    is the (1 − level)/2 and (1 + level)/2 quantiles of the resampled means. Seed-to-seed and
    prompt-to-prompt variation both widen it; one seed leaves only the prompts' share."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, a.shape[1], (reps, a.shape[1]))

    def means(x):
        s = rng.integers(0, x.shape[0], (reps, x.shape[0]))
        return x[s[:, :, None], p[:, None, :]].mean(axis=(1, 2))

    m = means(a) - (means(b) if b is not None else 0.0)
    return [float(np.quantile(m, (1 - level) / 2)), float(np.quantile(m, (1 + level) / 2))]


def verdict(ci: list[float]) -> str:
    """A difference is a gain or a loss only when its interval excludes 0."""
    return "gain" if ci[0] > 0 else "loss" if ci[1] < 0 else "no difference"


def difference(a: list[dict], b: list[dict], metric: str) -> dict:
    """Method a minus method b on one metric, from their per-prompt scores (lists over seeds): the mean,
    the paired bootstrap interval and its verdict."""
    x, y = (np.array([r["per_prompt"][metric] for r in runs], dtype=float) for runs in (a, b))
    ci = bootstrap_ci(x, y)
    return {"mean": float(x.mean() - y.mean()), "ci95": ci, "verdict": verdict(ci)}


# the paper's claims (§7.5, §7.6): (claim, method a, method b), each read as "a − b > 0"
CLAIMS = [("CAGSR > No-RL", "cagsr", "no-rl"), ("CAGSR > synthetic-pref", "cagsr", "synthetic-pref"),
          ("human-pref > CAGSR", "human-pref", "cagsr"), ("coverage helps", "cagsr", "cagsr-no-coverage"),
          ("focus helps", "cagsr", "cagsr-no-focus"), ("the repetition penalty helps", "cagsr", "cagsr-no-repeat")]


def claims(per_seed: dict) -> dict:
    """{dataset: {claim: {metric: difference}}} for each of CLAIMS whose two methods were run."""
    out = {}
    for dataset, methods in per_seed.items():
        metrics = [k for k in evaluate.PER_PROMPT if k in next(iter(methods.values()))[0].get("per_prompt", {})]
        for claim, a, b in CLAIMS:
            if a in methods and b in methods and metrics:
                out.setdefault(dataset, {})[claim] = {k: difference(methods[a], methods[b], k) for k in metrics}
    return out


def aggregate(per_seed: dict) -> dict:
    """{dataset: {method: [scores.json of seed 0, seed 1, ...]}} -> {dataset: {method: {metric: {mean, std,
    seeds}}}} (std over seeds, population form: 0 for one seed); a metric with per-prompt scores also
    gets its interval `ci95` and, for every method but No-RL, `diff`: the paired difference to No-RL's
    answers to the same prompts (mean, ci95, verdict)."""
    out = {}
    for dataset, methods in per_seed.items():
        base = methods.get("no-rl", [{}])[0].get("per_prompt", {})
        for method, runs in methods.items():
            cell = out.setdefault(dataset, {}).setdefault(method, {})
            for metric in runs[0]:
                if metric == "per_prompt":
                    continue
                xs = [r[metric] for r in runs]
                mean = sum(xs) / len(xs)
                cell[metric] = {"mean": mean, "std": (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5, "seeds": xs}
            for metric in runs[0].get("per_prompt", {}):
                x = np.array([r["per_prompt"][metric] for r in runs], dtype=float)
                cell[metric]["ci95"] = bootstrap_ci(x)
                if method != "no-rl" and metric in base:
                    cell[metric]["diff"] = difference(runs, [{"per_prompt": base}], metric)
    return out


def _cell(results, dataset, method, metric, digits=3):
    """mean [95 % interval] where per-prompt scores gave one, else mean ± std over seeds."""
    m = results.get(dataset, {}).get(method, {}).get(metric)
    if m is None:
        return "–"
    if "ci95" in m:
        return f"{m['mean']:.{digits}f} [{m['ci95'][0]:.{digits}f}, {m['ci95'][1]:.{digits}f}]"
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"


def _format_diff(d: dict, digits=3) -> str:
    lo, hi = d["ci95"]
    return f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {d['verdict'].replace('no difference', '·')}"


def _diff(results, dataset, method, metric, digits=3):
    d = results.get(dataset, {}).get(method, {}).get(metric, {}).get("diff")
    return "–" if d is None else _format_diff(d, digits)


def _judged(dataset: str) -> tuple[str, str]:
    """The data set's exact-content metric: QA fact accuracy or the instructions' required-item recall."""
    return ("fact_accuracy", "fact acc.") if dataset == "qa" else ("item_recall", "item recall")


def table1_markdown(results: dict, seeds: int) -> str:
    """Table 1 in the paper's layout (our mean and 95 % interval, the paper's value beside it), every
    method's paired difference to No-RL, then the §7.6 ablations and the reward-hacking indicators."""
    lines = [f"Intervals: 95 % bootstrap over test prompts and {seeds} RL seed(s) ({BOOTSTRAP_REPS} resamples). "
             "A difference to No-RL is called a gain or a loss only when its interval excludes 0 (· = neither).", ""]
    for dataset in results:
        key, name = _judged(dataset)
        lines += [f"#### {dataset}: Table 1 (oracle = simulated human score; paper = §7.5, Instruction set)", "",
                  f"| method | relevance | paper | ROUGE-L | paper | oracle (1–5) | paper | {name} | perplexity |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method in (m for m in TABLE1_METHODS if m in results[dataset]):
            paper = PAPER_TABLE1.get(method, ("–",) * 3)
            lines.append(f"| {method} | {_cell(results, dataset, method, 'relevance')} | {paper[0]} | "
                         f"{_cell(results, dataset, method, 'rouge_l')} | {paper[1]} | "
                         f"{_cell(results, dataset, method, 'oracle', 2)} | {paper[2]} | "
                         f"{_cell(results, dataset, method, key)} | {_cell(results, dataset, method, 'perplexity', 2)} |")
        lines += ["", f"#### {dataset}: paired difference to No-RL (same prompts), 95 % interval", "",
                  f"| method | relevance | ROUGE-L | oracle | {name} |", "| --- | --- | --- | --- | --- |"]
        for method in (m for m in results[dataset] if m != "no-rl"):
            lines.append("| " + " | ".join([method] + [_diff(results, dataset, method, k, 2 if k == "oracle" else 3)
                                                       for k in ("relevance", "rouge_l", "oracle", key)]) + " |")
        lines += ["", f"#### {dataset}: ablations of the CAGSR reward (§7.6)", "",
                  "| reward | relevance | ROUGE-L | oracle | CAGSR self-reward |", "| --- | --- | --- | --- | --- |"]
        for method in (m for m in ABLATION_METHODS if m in results[dataset]):
            lines.append("| " + " | ".join([method] + [_cell(results, dataset, method, k) for k in
                                                        ("relevance", "rouge_l", "oracle", "self_reward")]) + " |")
        lines += ["", f"#### {dataset}: reward-hacking indicators (mean ± std over seeds)", "",
                  "| method | words | distinct-2 | attention entropy | corr(self-reward, judge) |",
                  "| --- | --- | --- | --- | --- |"]
        for method in results[dataset]:
            lines.append("| " + " | ".join([method] + [_cell(results, dataset, method, k, 2) for k in
                                                        ("mean_length", "distinct_2", "attention_entropy",
                                                         "reward_relevance_pearson")]) + " |")
        lines.append("")
    return "\n".join(lines)


def claims_markdown(found: dict) -> str:
    """One row per claim and data set: each metric's difference a − b, its interval and verdict."""
    lines = ["#### The paper's claims, tested (a − b on the same test prompts, 95 % interval; gain = the claim holds)", "",
             "| claim (a − b) | data set | relevance | ROUGE-L | oracle | fact acc. / item recall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for claim, a, b in CLAIMS:
        for dataset, rows in found.items():
            if claim in rows:
                d, key = rows[claim], _judged(dataset)[0]
                cells = [_format_diff(d[k], 2 if k == "oracle" else 3) for k in ("relevance", "rouge_l", "oracle", key)]
                lines.append(f"| {claim} ({a} − {b}) | {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def provenance(argv: list[str], seconds: float) -> dict:
    """What made a results folder: the command, the machine (runtime.machine), the wall time."""
    return {"command": "python " + " ".join(argv), **machine(), "seconds": round(seconds),
            "date": time.strftime("%Y-%m-%d")}


def score_method(run: Path, size: str, method: str, seed: int, judge, cfg: PPOConfig, rcfg: RewardConfig,
                 rmcfg: RewardModelConfig, data: Path, rt, eval_prompts=300, force=False):
    """Train (unless no-rl) and score one method and seed on the first `eval_prompts` test prompts of
    each data set; the scores (means, and the per-prompt scores every interval is computed from) go to
    <run>/table1/<method>-seed<seed>/scores.json."""
    rdir = run / "table1" / f"{method}-seed{seed}"
    if (rdir / "scores.json").exists():
        return
    rdir.mkdir(parents=True, exist_ok=True)
    no_rl_scores = run / "table1" / "no-rl-seed0" / "scores.json"
    if method == "no-rl" and seed > 0 and no_rl_scores.exists():  # greedy answers of one SFT model
        return atomic_write(rdir / "scores.json", no_rl_scores.read_text())
    tok = tokenizer_for(run)
    path = run / "sft.pt" if method == "no-rl" else run_rl(run, size, method, rdir, cfg, rcfg, data, rt, seed, rmcfg,
                                                          force, resume=True)
    model = load_model(path, rt.device)
    scores = {}
    for d in DATASETS:
        records = load_split(d, "test", data)[:eval_prompts]
        texts, terms = evaluate.answer_and_reward(model, tok, records, reward_for(run, tok, rcfg), rcfg.last_layers,
                                                  rt.device)
        per_prompt = evaluate.per_prompt_scores(records, texts, judge, data)
        scores[d] = evaluate.score_responses(records, texts, judge, terms["reward"], terms["attn_entropy"], data,
                                             per_prompt)
        scores[d]["self_reward"] = sum(terms["reward"]) / len(records)
        scores[d]["perplexity"] = perplexity(model, encode_pairs(tok, records, model.cfg.max_len), device=rt.device)
        scores[d]["per_prompt"] = per_prompt
    atomic_write(rdir / "scores.json", json.dumps(scores, indent=2))
    print(f"table1: {method} seed {seed}: " + ", ".join(f"{d} relevance {s['relevance']:.3f} oracle "
                                                        f"{s['oracle']:.2f}" for d, s in scores.items()))


def check_methods(methods: list[str]) -> None:
    if unknown := [m for m in methods if m not in METHODS]:
        raise CLIError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")


def run_table1(run: Path, size: str, methods: list[str], seeds: int, cfg: PPOConfig, rcfg: RewardConfig,
               rmcfg: RewardModelConfig, data: Path, rt, judge_seed=0, eval_prompts=300, report_only=False,
               force=False, diagnose_prompts=100, publish: Path | None = None):
    """The reward diagnostic of <run>/sft.pt on `diagnose_prompts` validation prompts per data set
    (diagnose.py; reused when it exists, skipped with 0), then every method × seed (finished runs are
    reused; an interrupted one resumes). Writes under <run>/table1/: results.json (aggregate),
    claims.json (claims), per_prompt.json (the raw scores, [seed][prompt]), results.md (with the
    diagnostic), results.png and run.json (what made them); with `publish`, copies of them and of the
    diagnostic's files there (the repository's results/)."""
    t0, out = time.time(), run / "table1"
    check_methods(methods)
    sft_model = run / "sft.pt"
    if not report_only:
        stale = not (run / "diagnose.json").exists() or \
            json.loads((run / "diagnose.json").read_text())["checkpoint"] != str(sft_model)
        if diagnose_prompts and stale:  # the learned reward models only when a method trains them anyway
            run_diagnostic(run, sft_model, rcfg, rmcfg, data, rt, diagnose_prompts, cfg.samples, cfg.temperature,
                           learned=bool(set(methods) & LEARNED), seed=judge_seed)
        judge = run_judge(run, data, judge_seed)
        for seed in range(seeds):
            for method in methods:
                score_method(run, size, method, seed, judge, cfg, rcfg, rmcfg, data, rt, eval_prompts, force)
    per_seed = {}
    for method in methods:
        for seed in range(seeds):
            path = out / f"{method}-seed{seed}" / "scores.json"
            if path.exists():
                for d, scores in json.loads(path.read_text()).items():
                    per_seed.setdefault(d, {}).setdefault(method, []).append(scores)
    if not per_seed:
        raise CLIError(f"no finished Table-1 runs under {out}: run `python cagsr.py table1` first")
    results, found = aggregate(per_seed), claims(per_seed)
    if not report_only or not (out / "run.json").exists():
        made = provenance(sys.argv, time.time() - t0) | {"data": str(data), "seeds": seeds}
        atomic_write(out / "run.json", json.dumps(made, indent=2))
    made = json.loads((out / "run.json").read_text())
    md = [f"Made by `{made['command']}` on {made['cpu']}, torch {made['torch']}, {made['threads']} threads, "
          f"{made['date']} ({made['seconds'] / 60:.0f} min); data {os.path.relpath(made['data'])}.", ""]
    if (run / "diagnose.json").exists():
        md += ["### The reward diagnostic of the SFT model (validation split, before any RL)", "",
               diagnostic_markdown(json.loads((run / "diagnose.json").read_text())["results"])]
    md += ["### Table 1 and the ablations (test split)", "", table1_markdown(results, seeds), claims_markdown(found)]
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    atomic_write(out / "claims.json", json.dumps(found, indent=2))
    raw = {d: {m: {k: [[round(x, 4) for x in r["per_prompt"][k]] for r in runs] for k in runs[0].get("per_prompt", {})}
               for m, runs in methods.items()} for d, methods in per_seed.items()}  # [seed][prompt], to recompute any table
    atomic_write(out / "per_prompt.json", json.dumps(raw))
    atomic_write(out / "results.md", "\n".join(md))
    plot_table1(results, out / "results.png", METHODS)
    if publish:
        publish.mkdir(parents=True, exist_ok=True)
        for f in [out / n for n in ("results.json", "claims.json", "per_prompt.json", "results.md", "results.png",
                                    "run.json")] + \
                 [run / n for n in ("diagnose.json", "diagnose.md", "diagnose.png")]:
            if f.exists():
                atomic_write(publish / f.name, f.read_bytes())
    print("\n".join(md))
    print(f"table1: {len(methods)} methods × {seeds} seeds in {time.time() - t0:.0f} s -> {out}/results.md")


# ---- the README's results, generated from results/results.md (hard regime) and results/easy/results.md ---

ROOT = Path(__file__).resolve().parent
RESULTS = ("results/results.md", "results/easy/results.md")  # the committed runs, each a block of the README


def readme_markers(name: str) -> tuple[str, str]:
    return (f"<!-- begin {name}: `python table1.py --readme` writes this block, a test checks it -->",
            f"<!-- end {name} -->")


def readme_with_results(readme: str, name: str, results_md: str) -> str:
    """The README with the text between the markers of results file `name` replaced by its text."""
    begin, end = readme_markers(name)
    head, rest = readme.split(begin)
    return f"{head}{begin}\n{results_md.strip()}\n{end}{rest.split(end)[1]}"


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="copy each of results/**/results.md into its block of the README")
    ap.add_argument("--readme", action="store_true", required=True)
    ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in RESULTS:
        text = readme_with_results(text, name, (ROOT / name).read_text())
    atomic_write(readme, text)
    print(f"wrote {readme} from {', '.join(RESULTS)}")
