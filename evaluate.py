"""Evaluation metrics of §7.4, computed on the test splits.

§7.4 scores each model with a prompt-relevance classifier (relevance.py), ROUGE-L against the
references, a 1–5 human score and perplexity (sft.perplexity, beside the loss it exponentiates).
We have no annotators, so the human score is *simulated* by a rubric over each item's gold facts.
Because an RL policy can exploit any fixed scorer, section 5 adds indicators that make reward
hacking visible.

    1. exact facts            states_fact, fact_accuracy, item_recall
    2. ROUGE-L                rouge_l                                 (§7.4)
    3. simulated human score  oracle_score_simulated (= oracle_score)  (§7.4 "Human Score", 1–5)
    4. reward hacking         distinct_n, repeat_share, pearson, indicators
    5. one data set, one run  score_responses
    6. a model's answers      answers, answer_and_reward, evaluate_policy
"""
import functools
import math
import re
from pathlib import Path

import torch

from data import DATA_DIR, SPLITS, load_split
from data.user import data_sets, load
from sft import encode_pairs, pad, perplexity

# ---- 1. exact facts ------------------------------------------------------------------------------
# Exact-fact accuracy (QA): a greedy answer is correct when it states the gold fact verbatim
# (case-insensitive, whole words) — the automatic stand-in for "factually accurate responses" (§7.1).


def states_fact(answer: str, fact: str) -> bool:
    """True when `fact` appears in `answer` as whole words, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(fact.lower())}(?!\w)", answer.lower()) is not None


def fact_accuracy(answers: list[str], records: list[dict]) -> float:
    """Share of QA answers that state their record's gold fact."""
    return sum(states_fact(a, r["fact"]) for a, r in zip(answers, records, strict=True)) / len(records)


def item_recall(answer: str, record: dict) -> float:
    """Instruction sets: the share of the record's `required` items the answer mentions (whole words)."""
    return sum(states_fact(answer, item) for item in record["required"]) / len(record["required"])


# ---- 2. ROUGE-L ----------------------------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """Tokenise as the rouge-score package: lowercase, non-alphanumerics to spaces, split; no stemming."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """§7.4 ROUGE-L F1: P = LCS/|candidate|, R = LCS/|reference|, F = 2PR/(P+R); 0 if either is empty."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c or not r:
        return 0.0
    lcs = lcs_length(r, c)
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall) if lcs else 0.0


# ---- 3. simulated human score ----------------------------------------------------------------------
# §7.4's annotators rated helpfulness and correctness from 1 to 5. We simulate them with a rubric
# over what the data generator knows is right: each item's gold fact and entity (QA), its required
# items and topic (instruct), and the world's other entities and topics, so that an answer about
# another country that happens to share the fact is not counted as correct. It is a fixed scorer
# the policy never sees: an *oracle*.

MIN_WORDS = 3  # every reference has at least 4 words
MAX_LENGTH_RATIO = 3  # references of one data set differ in length by at most 2.4×
MAX_REPEAT_SHARE = 0.3  # the most repetitive reference repeats 15 % of its word bigrams
MAX_PROMPT_ROUGE = 0.85  # no reference overlaps its prompt above 0.77: more is an echo of the prompt


def repeat_share(words: list[str], n: int = 2) -> float:
    """Share of the n-grams of one response that already occurred earlier in it (reward.py's, on words)."""
    grams = list(zip(*(words[i:] for i in range(n))))
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def degenerate(response: str, record: dict) -> bool:
    """Under MIN_WORDS words (empty included), over MAX_LENGTH_RATIO× the reference's words, repetitive,
    or an echo of the prompt (which would name every required item without answering)."""
    words = rouge_tokens(response)
    return (len(words) < MIN_WORDS or len(words) > MAX_LENGTH_RATIO * len(rouge_tokens(record["response"]))
            or repeat_share(words) > MAX_REPEAT_SHARE or rouge_l(response, record["prompt"]) > MAX_PROMPT_ROUGE)


def complete_sentence(response: str) -> bool:
    """Starts with a capital letter or digit and ends with '.' or '!'."""
    text = response.strip()
    return bool(text) and (text[0].isupper() or text[0].isdigit()) and text[-1] in ".!"


@functools.cache
def subject_pattern(dataset: str, data_root: Path = DATA_DIR) -> re.Pattern:
    """Every subject of a data set's world (QA entities or instruction topics), as one whole-word regex."""
    key = "entity" if dataset == "qa" else "topic"
    names = {r[key].lower() for split in SPLITS for r in load_split(dataset, split, data_root)}
    longest_first = sorted(map(re.escape, names), key=len, reverse=True)
    return re.compile(rf"(?<!\w)({'|'.join(longest_first)})(?!\w)")


def oracle_score_simulated(response: str, record: dict, data_root: Path = DATA_DIR) -> float:
    """§7.4 human score, SIMULATED by a rubric: 1 (useless) … 5 (as good as the reference).

    A degenerate response (see `degenerate`) scores 1. Otherwise 1 plus:
      QA        on topic = names the asked entity, or states the gold fact and names no other entity;
                +2 states the gold fact and is on topic; +1 on topic; +1 complete sentence → 1, 2, 3, 4, 5
      instruct  on topic = names the topic, or names no other topic of the data set;
                +3 × share of the required items mentioned, if on topic; +1 names the topic → 1 … 5
    Mentions are whole words, ignoring case (`states_fact`).
    """
    if degenerate(response, record):
        return 1.0
    qa = "fact" in record
    subject = record["entity" if qa else "topic"].lower()
    named = set(subject_pattern("qa" if qa else "instruct", data_root).findall(response.lower()))
    names_subject, names_another = subject in named, bool(named - {subject})
    if qa:
        correct = states_fact(response, record["fact"])
        on_topic = names_subject or (correct and not names_another)
        return 1.0 + 2 * (correct and on_topic) + on_topic + complete_sentence(response)
    on_topic = names_subject or not names_another
    return 1.0 + 3 * item_recall(response, record) * on_topic + names_subject


oracle_score = oracle_score_simulated  # the short name the Table-1 code uses; the metric is "oracle"


# ---- 4. reward-hacking indicators ------------------------------------------------------------------
# A policy that games its reward shows it here before it shows it in a mean: shorter or longer
# answers, fewer distinct n-grams across prompts (one template for everything), more repetition,
# and a reward that stops tracking the oracle.


def distinct_n(responses: list[str], n: int = 2) -> float:
    """Distinct-n over a set: unique n-grams / all n-grams, pooled over responses (0 if there are none)."""
    grams = [g for r in responses for g in zip(*(rouge_tokens(r)[i:] for i in range(n)))]
    return len(set(grams)) / len(grams) if grams else 0.0


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation; 0 when either variance is 0 (or NaN values leave fewer than 2 pairs)."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 2:
        return 0.0
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def indicators(responses: list[str], rewards: list[float] | None = None, oracle: list[float] | None = None,
               attention_entropy: list[float] | None = None) -> dict[str, float]:
    """Mean length (words), distinct-2, mean repeat share, share empty; with rewards and oracle
    scores, their Pearson correlation; with per-response mean cross-attention entropy, its mean."""
    words = [rouge_tokens(r) for r in responses]
    out = {
        "mean_length": sum(map(len, words)) / len(words),
        "distinct_2": distinct_n(responses, 2),
        "repeat": sum(map(repeat_share, words)) / len(words),
        "empty": sum(not w for w in words) / len(words),
    }
    if rewards is not None and oracle is not None:
        out["reward_oracle_pearson"] = pearson(rewards, oracle)
    if attention_entropy is not None:
        out["attention_entropy"] = sum(attention_entropy) / len(attention_entropy)
    return out


# ---- 5. one data set, one method, one seed -------------------------------------------------------


PER_PROMPT = ("relevance", "rouge_l", "oracle", "fact_accuracy", "item_recall")  # the metrics that are means over prompts


def per_prompt_scores(records: list[dict], responses: list[str], judge, data_root: Path = DATA_DIR) -> dict[str, list]:
    """Each of PER_PROMPT's metrics per response (fact_accuracy as 0/1 where the records have a gold fact,
    item_recall where they have required items): the raw scores any table is recomputed from."""
    if len(records) != len(responses) or not records:
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    out = {"relevance": judge.score([r["prompt"] for r in records], responses),
           "rouge_l": [rouge_l(y, r["response"]) for y, r in zip(responses, records)],
           "oracle": [oracle_score(y, r, data_root) for y, r in zip(responses, records)]}
    if "fact" in records[0]:
        out["fact_accuracy"] = [float(states_fact(y, r["fact"])) for y, r in zip(responses, records)]
    if "required" in records[0]:
        out["item_recall"] = [item_recall(y, r) for y, r in zip(responses, records)]
    return out


def score_responses(records: list[dict], responses: list[str], judge,
                    rewards: list[float] | None = None, attention_entropy: list[float] | None = None,
                    data_root: Path = DATA_DIR, per_prompt: dict | None = None) -> dict[str, float]:
    """Means of §7.4's metrics (relevance from `judge`, a relevance.RelevanceJudge; rouge_l; oracle; and
    fact accuracy or item recall) and the indicators over one data set; `per_prompt` (per_prompt_scores),
    when given, saves scoring the responses again."""
    per_prompt = per_prompt or per_prompt_scores(records, responses, judge, data_root)
    result = {k: sum(v) / len(v) for k, v in per_prompt.items()}
    if rewards is not None:  # does the self-reward agree with the judge the policy never trained on?
        result["reward_relevance_pearson"] = pearson(rewards, per_prompt["relevance"])
    return result | indicators(responses, rewards, per_prompt["oracle"], attention_entropy)


# ---- 6. a model's answers, and their scores ---------------------------------------------------


@torch.no_grad()
def answers(model, tok, prompts: list[str], greedy=True, temperature=1.0, batch_size=128, device="cpu") -> list[str]:
    """One decoded response per prompt: greedy, or sampled at `temperature`."""
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        src = pad([tok.encode(p) for p in prompts[i : i + batch_size]], tok.pad_id).to(device)
        rollout = model.generate(src, greedy=greedy, temperature=temperature, capture_last=0)
        out += [tok.decode(row.tolist()) for row in rollout.tokens]
    return out


@torch.no_grad()
def answer_and_reward(model, tok, records, reward_fn, last_layers=1, device="cpu", batch_size=128):
    """Greedy answers to the records' prompts and, per answer, the CAGSR reward terms of its Ā:
    (answers, {"reward": [...], "coverage": [...], ..., "length": [...]})."""
    model.eval()
    texts, terms = [], {}
    for i in range(0, len(records), batch_size):
        src = pad([tok.encode(r["prompt"]) for r in records[i : i + batch_size]], tok.pad_id).to(device)
        r = model.generate(src, greedy=True, capture_last=last_layers)
        total, parts = reward_fn(r, src)
        for k, v in {"reward": total, **parts, "length": r.mask.sum(1).float()}.items():
            terms.setdefault(k, []).extend(v.tolist())
        texts += [tok.decode(row.tolist()) for row in r.tokens]
    return texts, terms


def evaluate_policy(model, tok, reward_fn, last_layers=1, data=DATA_DIR, device="cpu") -> dict:
    """On the test splits behind `data`, from greedy answers: QA exact-fact accuracy, the instructions'
    required-item recall; per data set the
    mean CAGSR reward terms and response length, and the perplexity of the references (where the
    records have them: a user's RL-only prompts may not)."""
    result = {}
    for d in data_sets(data):
        records = load(d, "test", data)
        texts, terms = answer_and_reward(model, tok, records, reward_fn, last_layers, device)
        result.update({f"{d}_{k}": sum(v) / len(v) for k, v in terms.items() if k != "below_floor"})
        references = [r for r in records if "response" in r]
        if references:
            result[f"{d}_test_ppl"] = perplexity(model, encode_pairs(tok, references, model.cfg.max_len), device=device)
        if "fact" in records[0]:
            result[f"{d}_fact_accuracy"] = fact_accuracy(texts, records)
        if "required" in records[0]:
            result[f"{d}_item_recall"] = sum(item_recall(y, r) for y, r in zip(texts, records)) / len(records)
    return result
