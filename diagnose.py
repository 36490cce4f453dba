"""The reward diagnostic, before any RL: does a reward order answers the way the judges do?

PPO only uses a reward through the differences it makes between answers to the same prompt (the
advantages), so the question that decides whether RL on a reward can help is whether those
differences point the right way. On N sampled answers per validation prompt from the SFT policy (N
and the temperature are the RL stage's), for every reward an RL method could optimise (CAGSR, each of
its terms alone, the ablations, the learned reward models of §7.3, the hybrid):

    oracle agreement   of the pairs of answers to one prompt that the oracle orders, the share the
                       reward orders the same way (a tie in reward counts ½): 0.5 = uninformative
    relevance ρ        rank correlation with the relevance judge over all answers
    length ρ           rank correlation with the answer's length: how much of the reward is length
    empty wins         share of prompts on which the empty answer (EOS alone) out-scores the greedy one

and the within-prompt slope of the CAGSR reward on length, with the reward that cancels it ("cagsr +
λ̂·|y|", RewardConfig.length_bonus = λ̂) — fitted on the same answers, so its row is optimistic.

    python cagsr.py diagnose                       # runs/tiny: its SFT model, 100 prompts × N = 4 samples
    python cagsr.py diagnose --checkpoint runs/tiny/cagsr/rl.pt --prompts 200

Writes <run>/diagnose.json (every number, per data set and reward), diagnose.md and diagnose.png.
The oracle and the judge are those of Table 1 (evaluate.py, relevance.py); the validation split only,
so that choosing a reward on this diagnostic never touches the test split.
"""
import json
from dataclasses import replace
from pathlib import Path

import torch

import evaluate
from baselines import ABLATIONS, HYBRID_WEIGHT, learned_reward
from data.tokenizer import tokenizer_for
from data.user import data_sets, load
from model import Rollout
from plots import plot_diagnostic
from relevance import run_judge
from reward import RewardConfig, reward_for
from rundir import atomic_write, load_model
from sft import pad


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their ranks (as Spearman's ρ needs)."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's ρ = Pearson correlation of the ranks (0 when either side is constant)."""
    return evaluate.pearson(ranks(xs), ranks(ys))


def oracle_agreement(rewards: list[list[float]], oracle: list[list[float]]) -> tuple[float, int]:
    """Over every prompt's pairs (i, j) of answers with o_i ≠ o_j: the mean of 1[(r_i − r_j)(o_i − o_j) > 0]
    + ½·1[r_i = r_j]. Returns (agreement, number of such pairs); NaN when no pair is ordered."""
    score, pairs = 0.0, 0
    for r, o in zip(rewards, oracle, strict=True):
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                if o[i] != o[j]:
                    pairs += 1
                    score += 0.5 if r[i] == r[j] else float((r[i] - r[j]) * (o[i] - o[j]) > 0)
    return (score / pairs if pairs else float("nan")), pairs


def empty_rollout(model, src, capture_last: int) -> Rollout:
    """The empty answer (EOS alone) to each prompt, with the Ā of its one step (teacher-forced)."""
    with torch.no_grad():
        _, attn = model(src, torch.full((src.shape[0], 1), model.cfg.pad_id, device=src.device), capture_last)
    ones = torch.ones(src.shape[0], 1, device=src.device)
    return Rollout(torch.full((src.shape[0], 1), model.cfg.eos_id, device=src.device), 0 * ones, ones.bool(), attn)


# the reward variants of §3.2 and §6 the diagnostic measures beside the configured CAGSR reward
VARIANTS = {"cagsr, IDF-weighted I_x": {"idf_weighted": True}, "cagsr, τ = 2": {"attention_temperature": 2.0},
            "cagsr, τ = 0.5": {"attention_temperature": 0.5}, "cagsr, trigrams": {"ngram": 3},
            "cagsr, floor h = 1.9": {"entropy_floor": 1.9}}
LENGTH_CORRECTED = "cagsr + λ̂·|y|"  # the CAGSR reward with the length bonus that cancels its measured slope


def rewards_to_diagnose(run: Path, rcfg: RewardConfig, rmcfg, data: Path, rt, learned=True) -> dict:
    """name -> function(rollout, src) -> [B·N] scores: CAGSR (as configured), each term alone (larger =
    better), the ablations, the VARIANTS, and (with `learned`) the §7.3 reward models and the hybrid —
    those trained on first use."""
    tok = tokenizer_for(run)
    cagsr = reward_for(run, tok, rcfg)

    def term(key, sign=1.0):
        return lambda rollout, src: sign * cagsr(rollout, src)[1][key]

    out = {"cagsr": lambda r, s: cagsr(r, s)[0], "coverage": term("coverage"), "focus": term("focus"),
           "−repeat": term("repeat", -1.0)}
    for name, change in {**ABLATIONS, **VARIANTS}.items():
        fn = reward_for(run, tok, replace(rcfg, **change))
        out[name] = lambda r, s, fn=fn: fn(r, s)[0]
    if learned:
        for kind in ("synthetic", "human"):
            rm = learned_reward(kind, run, rmcfg, data, rt)
            out[f"{kind}-pref RM"] = lambda r, s, rm=rm: rm(r, s)[0]
        human = out["human-pref RM"]
        out["hybrid"] = lambda r, s: out["cagsr"](r, s) + HYBRID_WEIGHT * human(r, s)
    return out


def length_slope(rewards: list[list[float]], lengths: list[list[float]]) -> float:
    """Within-prompt least-squares slope of reward on length: Σ (r − r̄_x)(ℓ − ℓ̄_x) / Σ (ℓ − ℓ̄_x)², the
    means taken over each prompt's own answers (so prompts that are easier or longer do not count)."""
    sxy = sxx = 0.0
    for r, ell in zip(rewards, lengths, strict=True):
        mr, ml = sum(r) / len(r), sum(ell) / len(ell)
        sxy += sum((a - mr) * (b - ml) for a, b in zip(r, ell))
        sxx += sum((b - ml) ** 2 for b in ell)
    return sxy / sxx if sxx else 0.0


@torch.no_grad()
def diagnose_dataset(model, tok, records: list[dict], rewards: dict, judge, samples: int, temperature: float,
                     capture_last: int, data: Path, batch_prompts: int = 32, device="cpu") -> dict:
    """The four numbers of the module docstring for every reward, on `samples` answers to each record; and
    the CAGSR reward corrected by the length bonus λ̂ = −length_slope (fitted on these answers)."""
    model.eval()
    scores = {name: [] for name in rewards}  # name -> per prompt, N scores
    empty, greedy = {name: [] for name in rewards}, {name: [] for name in rewards}  # name -> per prompt
    oracle, lengths, greedy_lengths, texts = [], [], [], []
    for i in range(0, len(records), batch_prompts):
        batch = records[i : i + batch_prompts]
        src = pad([tok.encode(r["prompt"]) for r in batch], tok.pad_id).to(device)
        rollout = model.generate(src, num_samples=samples, temperature=temperature, capture_last=capture_last)
        best = model.generate(src, greedy=True, capture_last=capture_last)
        nothing = empty_rollout(model, src, capture_last)
        for name, fn in rewards.items():
            scores[name] += fn(rollout, src).view(len(batch), samples).tolist()
            empty[name] += fn(nothing, src).tolist()
            greedy[name] += fn(best, src).tolist()
        answers = [tok.decode(row.tolist()) for row in rollout.tokens]
        for b, record in enumerate(batch):
            mine = answers[b * samples : (b + 1) * samples]
            oracle.append([evaluate.oracle_score(y, record, data) for y in mine])
            texts += mine
        lengths += rollout.mask.sum(1).view(len(batch), samples).tolist()
        greedy_lengths += best.mask.sum(1).tolist()
    lam = -length_slope(scores["cagsr"], lengths)
    scores[LENGTH_CORRECTED] = [[r + lam * n for r, n in zip(rs, ns)] for rs, ns in zip(scores["cagsr"], lengths)]
    empty[LENGTH_CORRECTED] = [r + lam for r in empty["cagsr"]]  # the empty answer is one token, EOS
    greedy[LENGTH_CORRECTED] = [r + lam * n for r, n in zip(greedy["cagsr"], greedy_lengths)]
    relevance = judge.score([r["prompt"] for r in records for _ in range(samples)], texts)
    flat_oracle, flat_lengths = [o for row in oracle for o in row], [n for row in lengths for n in row]
    out = {"prompts": len(records), "samples": samples, "ordered_pairs": oracle_agreement(oracle, oracle)[1],
           "length_bonus": lam,
           "oracle": {"relevance_rho": spearman(flat_oracle, relevance), "length_rho": spearman(flat_oracle, flat_lengths)}}
    for name, per_prompt in scores.items():
        flat = [s for row in per_prompt for s in row]
        out[name] = {"oracle_agreement": oracle_agreement(per_prompt, oracle)[0],
                     "relevance_rho": spearman(flat, relevance), "length_rho": spearman(flat, flat_lengths),
                     "empty_wins": sum(e > g for e, g in zip(empty[name], greedy[name])) / len(records)}
    return out


def diagnostic_markdown(results: dict) -> str:
    """One table per data set: a row per reward, the oracle's own correlations first for reference."""
    lines = []
    for dataset, r in results.items():
        lines += [f"#### {dataset}: {r['prompts']} validation prompts × {r['samples']} samples, "
                  f"{r['ordered_pairs']} pairs the oracle orders; λ̂ = {r['length_bonus']:.4f} per token", "",
                  "| reward | oracle agreement | relevance ρ | length ρ | empty wins |", "| --- | ---: | ---: | ---: | ---: |",
                  f"| oracle (reference) | 1 | {r['oracle']['relevance_rho']:.3f} | {r['oracle']['length_rho']:.3f} | – |"]
        for name, m in r.items():
            if isinstance(m, dict) and "oracle_agreement" in m:
                lines.append(f"| {name} | {m['oracle_agreement']:.3f} | {m['relevance_rho']:.3f} | "
                             f"{m['length_rho']:.3f} | {m['empty_wins']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def run_diagnostic(run: Path, checkpoint: Path, rcfg: RewardConfig, rmcfg, data: Path, rt, prompts=100, samples=8,
                   temperature=1.0, learned=True, seed=0) -> dict:
    """The diagnostic of `checkpoint` on the first `prompts` validation prompts of each data set."""
    tok, model = tokenizer_for(run), load_model(checkpoint, rt.device)
    rewards = rewards_to_diagnose(run, rcfg, rmcfg, data, rt, learned)
    judge = run_judge(run, data)
    torch.manual_seed(seed)  # here: the samples do not depend on whether the reward models were trained just now
    results = {d: diagnose_dataset(model, tok, load(d, "validation", data)[:prompts], rewards, judge, samples,
                                   temperature, rcfg.last_layers, data, device=rt.device)
               for d in data_sets(data)}
    report = {"checkpoint": str(checkpoint), "temperature": temperature, "seed": seed, "results": results}
    atomic_write(run / "diagnose.json", json.dumps(report, indent=2))
    md = diagnostic_markdown(results)
    atomic_write(run / "diagnose.md", md)
    plot_diagnostic(results, run / "diagnose.png")
    print(md)
    print(f"diagnostic: {run / 'diagnose.json'}, {run / 'diagnose.md'}, {run / 'diagnose.png'}")
    return results
