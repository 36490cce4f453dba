"""Table 1 and the ablations (§7.3–7.6): every method with the same RL budget and seeds, scored on the
test split by judges no policy trained against, as mean ± std over seeds beside the paper's numbers.

    run_table1      train (or reuse) and score every method × seed; results.json, results.md, results.png
    score_method    one method, one seed → <run>/table1/<method>-seed<k>/scores.json
    aggregate       seeds → mean, std
    table1_markdown the paper's layout, then the ablations and the reward-hacking indicators
"""
import json
import time
from pathlib import Path

import evaluate
from baselines import METHODS, RewardModelConfig
from data import DATASETS, load_split
from data.tokenizer import tokenizer_for
from plots import plot_table1
from ppo import PPOConfig
from relevance import run_judge
from reward import RewardConfig, reward_for
from rl import run_rl
from rundir import CLIError, atomic_write, load_model
from sft import encode_pairs, perplexity

TABLE1_METHODS, ABLATION_METHODS = METHODS[:4] + ("hybrid",), ("cagsr",) + METHODS[4:7]
# §7.5, Table 1 (Instruction data set): relevance, ROUGE-L, human score (1–5)
PAPER_TABLE1 = {"no-rl": (0.72, 0.33, 3.2), "synthetic-pref": (0.78, 0.37, 3.5), "cagsr": (0.83, 0.39, 3.7),
                "human-pref": (0.87, 0.44, 4.0)}


def aggregate(per_seed: dict) -> dict:
    """{dataset: {method: [metrics of seed 0, seed 1, ...]}} -> {dataset: {method: {metric: {mean, std,
    seeds}}}} (std over seeds, population form: 0 for one seed)."""
    out = {}
    for dataset, methods in per_seed.items():
        for method, runs in methods.items():
            cell = out.setdefault(dataset, {}).setdefault(method, {})
            for metric in runs[0]:
                xs = [r[metric] for r in runs]
                mean = sum(xs) / len(xs)
                cell[metric] = {"mean": mean, "std": (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5, "seeds": xs}
    return out


def _cell(results, dataset, method, metric, digits=3):
    m = results.get(dataset, {}).get(method, {}).get(metric)
    return "–" if m is None else f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"


def table1_markdown(results: dict) -> str:
    """Table 1 in the paper's layout (our mean ± std over seeds, the paper's value beside it), then the
    §7.6 ablations and the reward-hacking indicators."""
    lines = []
    for dataset in results:
        lines += [f"### {dataset}: Table 1 (oracle = simulated human score; paper = §7.5, Instruction set)", "",
                  "| method | relevance | paper | ROUGE-L | paper | oracle (1–5) | paper | perplexity |"
                  + (" fact acc. |" if dataset == "qa" else ""),
                  "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if dataset == "qa" else "")]
        for method in TABLE1_METHODS:
            if method not in results[dataset]:
                continue
            paper = PAPER_TABLE1.get(method, ("–",) * 3)
            row = [method, _cell(results, dataset, method, "relevance"), str(paper[0]),
                   _cell(results, dataset, method, "rouge_l"), str(paper[1]),
                   _cell(results, dataset, method, "oracle", 2), str(paper[2]),
                   _cell(results, dataset, method, "perplexity", 2)]
            if dataset == "qa":
                row.append(_cell(results, dataset, method, "fact_accuracy"))
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"### {dataset}: ablations of the CAGSR reward (§7.6)", "",
                  "| reward | relevance | ROUGE-L | oracle | CAGSR self-reward |", "| --- | --- | --- | --- | --- |"]
        for method in ABLATION_METHODS:
            if method in results[dataset]:
                lines.append("| " + " | ".join([method] + [_cell(results, dataset, method, k) for k in
                                                            ("relevance", "rouge_l", "oracle", "self_reward")]) + " |")
        lines += ["", f"### {dataset}: reward-hacking indicators", "",
                  "| method | words | distinct-2 | attention entropy | corr(self-reward, judge) |",
                  "| --- | --- | --- | --- | --- |"]
        for method in results[dataset]:
            lines.append("| " + " | ".join([method] + [_cell(results, dataset, method, k, 2) for k in
                                                        ("mean_length", "distinct_2", "attention_entropy",
                                                         "reward_relevance_pearson")]) + " |")
        lines.append("")
    return "\n".join(lines)


def score_method(run: Path, size: str, method: str, seed: int, judge, cfg: PPOConfig, rcfg: RewardConfig,
                 rmcfg: RewardModelConfig, data: Path, rt, eval_prompts=300, force=False):
    """Train (unless no-rl) and score one method and seed on the first `eval_prompts` test prompts of
    each data set; the scores go to <run>/table1/<method>-seed<seed>/scores.json."""
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
        scores[d] = evaluate.score_responses(records, texts, judge, terms["reward"], terms["attn_entropy"], data)
        scores[d]["self_reward"] = sum(terms["reward"]) / len(records)
        scores[d]["perplexity"] = perplexity(model, encode_pairs(tok, records, model.cfg.max_len), device=rt.device)
    atomic_write(rdir / "scores.json", json.dumps(scores, indent=2))
    print(f"table1: {method} seed {seed}: " + ", ".join(f"{d} relevance {s['relevance']:.3f} oracle "
                                                        f"{s['oracle']:.2f}" for d, s in scores.items()))


def check_methods(methods: list[str]) -> None:
    if unknown := [m for m in methods if m not in METHODS]:
        raise CLIError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")


def run_table1(run: Path, size: str, methods: list[str], seeds: int, cfg: PPOConfig, rcfg: RewardConfig,
               rmcfg: RewardModelConfig, data: Path, rt, judge_seed=0, eval_prompts=300, report_only=False,
               force=False):
    """Every method × seed (finished runs are reused; an interrupted one resumes), from <run>/sft.pt;
    writes results.json, results.md and results.png under <run>/table1/."""
    t0, out = time.time(), run / "table1"
    check_methods(methods)
    if not report_only:
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
    results = aggregate(per_seed)
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    atomic_write(out / "results.md", table1_markdown(results))
    plot_table1(results, out / "results.png", METHODS)
    print(table1_markdown(results))
    print(f"table1: {len(methods)} methods × {seeds} seeds in {time.time() - t0:.0f} s -> {out}/results.md")
