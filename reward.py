"""The self-supervised reward of CAGSR (arXiv 2502.10482, §3.2, with §6's entropy floor), computed
from the decoder's cross-attention alone:

    R(x, y) = α·coverage(x, y) + β·focus(x, y) − γ·repeatPenalty(y)

    1. RewardConfig      α, β, γ, the entropy floor, L', the n-gram order, the I_x selection and the
                         variants of §3.2 (IDF weights, temperature) and of length: defined here once
    2. I_x               important_token_mask (IDF and entities), important_token_weights
    3. Ā                 aggregate_layers
    4. the terms         coverage, attention_entropy, tempered, focus, repeat_penalty, cagsr_reward
    5. for the RL loop   AttentionReward (a rollout → R and its terms), reward_for (from a run directory)

The learned reward models of the baselines (§7.3) are in baselines.py.

Every function below is a pure, batched tensor function. Shapes: B sequences, T response
steps, S prompt tokens. Masks are bool, True = real token. Ā `[B, T, S]` is the aggregated
cross-attention: each real response row sums to 1 over the prompt and padded prompt
positions carry exactly 0 weight, so no prompt mask is needed (0·log 0 = 0).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from rundir import CLIError, atomic_write

# ─── 1. The reward's configuration ────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class RewardConfig:
    alpha: float = 1.0  # coverage weight α (§5, §7.2)
    beta: float = 0.5  # focus weight β
    gamma: float = 1.0  # repetition-penalty weight γ
    entropy_floor: float = 0.0  # §6 floor h on attention entropy: sharper attention earns nothing more (0 = off)
    last_layers: int = 1  # L' of §3.2: decoder layers averaged into Ā
    ngram: int = 2  # n of the repetition penalty's n-grams
    top_k: int = 3  # I_x: words of highest IDF per prompt (entities come on top)
    # the variants §3.2 proposes, and one for the length bias `python cagsr.py diagnose` measures (off = the paper)
    idf_weighted: bool = False  # coverage weighs each I_x token by its word's IDF ("semantic importance")
    attention_temperature: float = 1.0  # τ: focus reads the entropy of Ā^(1/τ), renormalised ("temperature scaling")
    length_bonus: float = 0.0  # λ: R gains λ per response token, to offset a preference for short answers


# ─── 2. I_x: the important prompt tokens ──────────────────────────────────────────────────────────
# §3.2 assumes "a subset of crucial tokens I_x ⊆ {1, …, |x|} [found] by heuristics such as inverse
# document frequency (IDF) or named entity recognition". Ours works on words, then marks every
# letter/digit piece of a chosen word:
#   - the top_k words of highest IDF in the prompt (or those with IDF ≥ threshold), and
#   - entities: capitalised words not starting a sentence, and words with a digit.
# Padding, special tokens and pure punctuation pieces are never in I_x.

SPECIAL_IDS = (0, 1, 2)  # T5's <pad>, </s>, <unk>; pass the tokenizer's own ids if they differ
WORD_START = "\u2581"  # "▁": sentencepiece marks the first piece of a word with it
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback, e.g. "<0x41>"


def _normalise(word: str) -> str:
    """The IDF key of a word: lowercased, punctuation stripped ("Zorvania?" → "zorvania")."""
    return "".join(ch for ch in word.lower() if ch.isalnum())


def fit_idf(prompts: list[str]) -> dict[str, float]:
    """IDF over the training prompts: idf(w) = log((1 + N) / (1 + df(w))), N = #prompts.

    df(w) = #prompts containing w. The +1s keep it finite and ≥ 0 (0 for a word in every
    prompt); a word never seen (df = 0) would get the largest value, log(1 + N).
    """
    df = Counter(key for prompt in prompts for key in {_normalise(w) for w in prompt.split()} if key)
    return {key: math.log((1 + len(prompts)) / (1 + count)) for key, count in sorted(df.items())}


def save_idf(idf: dict[str, float], path: str) -> None:
    """Write the IDF table as JSON atomically (rundir.atomic_write)."""
    atomic_write(Path(path), json.dumps(idf, indent=0, sort_keys=True))


def load_idf(path: str) -> dict[str, float]:
    """Read a table written by save_idf; ValueError if the file is not one."""
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not an IDF table ({e})") from None
    if not isinstance(table, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in table.values()
    ):
        raise ValueError(f"{path}: not an IDF table (want a JSON object of word → number)")
    return {key: float(v) for key, v in table.items()}


def _piece_text(piece: str) -> tuple[bytes, bool]:
    """The UTF-8 bytes a piece spells, and whether it holds a letter or digit."""
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        b = int(byte.group(1), 16)
        return bytes([b]), b >= 0x80 or chr(b).isalnum()  # a non-ASCII byte is part of a letter like "é"
    text = piece.replace(WORD_START, "")
    return text.encode(), any(ch.isalnum() for ch in text)


def _prompt_words(ids: list[int], pieces: list[str], special: set[int]) -> list[tuple[str, list[int]]]:
    """Rebuild one prompt's words from its pieces: (surface text, positions of its letter/digit pieces).

    A piece starting with "▁" (U+2581) starts a word; special tokens end one and belong to none.
    """
    words: list[tuple[bytearray, list[int]]] = []
    in_word = False
    for pos, i in enumerate(ids):
        if i in special:
            in_word = False
            continue
        raw, has_content = _piece_text(pieces[i])
        if pieces[i].startswith(WORD_START) or not in_word:
            words.append((bytearray(), []))
            in_word = True
        words[-1][0].extend(raw)
        if has_content:
            words[-1][1].append(pos)
    return [(raw.decode("utf-8", "replace"), positions) for raw, positions in words]


def _choose_words(
    words: list[tuple[str, list[int]]], idf: dict[str, float], threshold: float | None, top_k: int | None
) -> list[bool]:
    """For each word of one prompt: is it in I_x (high IDF, or an entity)?"""
    keys = [_normalise(text) for text, _ in words]
    unseen = max(idf.values(), default=0.0)  # a word absent from the training prompts is as rare as any
    score = {key: idf.get(key, unseen) for key in keys if key}  # insertion order = first occurrence
    if threshold is not None:
        by_idf = {key for key, s in score.items() if s >= threshold}
    else:
        by_idf = set(sorted(score, key=lambda key: -score[key])[:top_k])  # stable: ties go to the earlier word
    chosen, sentence_start = [], True
    for (text, _), key in zip(words, keys):
        first = next((ch for ch in text if ch.isalnum()), "")
        # A capital at a sentence start says nothing; elsewhere it marks a name ("Zorvania"), except "I".
        entity = (first.isupper() and not sentence_start and key != "i") or any(ch.isdigit() for ch in text)
        chosen.append(bool(key) and (key in by_idf or entity))
        sentence_start = text.rstrip("\"')]")[-1:] in (".", "!", "?")
    return chosen


def _important_words_per_prompt(
    prompt_ids: torch.Tensor, idf: dict[str, float], pieces: list[str],
    special_ids: tuple[int, ...] = SPECIAL_IDS, threshold: float | None = None, top_k: int | None = None,
    pad_id: int = 0,
) -> list[list[tuple[str, list[int]]]]:
    """Per prompt, the chosen words as (surface text, piece positions); checks the arguments."""
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [B,S], got shape {tuple(prompt_ids.shape)}")
    if threshold is not None and top_k is not None:
        raise ValueError("give threshold or top_k, not both")
    if threshold is None and top_k is None:
        top_k = RewardConfig.top_k
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be ≥ 0, got {top_k}")
    if prompt_ids.numel() and not 0 <= prompt_ids.min() <= prompt_ids.max() < len(pieces):
        raise ValueError(f"prompt_ids must lie in 0..{len(pieces) - 1} (the piece list)")
    special = {*special_ids, pad_id}
    chosen = []
    for ids in prompt_ids.tolist():
        words = _prompt_words(ids, pieces, special)
        keep = _choose_words(words, idf, threshold, top_k)
        chosen.append([word for word, k in zip(words, keep) if k])
    return chosen


def important_token_mask(
    prompt_ids: torch.Tensor,
    idf: dict[str, float],
    pieces: list[str],
    special_ids: tuple[int, ...] = SPECIAL_IDS,
    threshold: float | None = None,
    top_k: int | None = None,
    pad_id: int = 0,
) -> torch.Tensor:
    """I_x of §3.2 as a mask: prompt_ids `[B, S]` → Bool `[B, S]`, True on every piece of a chosen word.

    pieces[i] is the sentencepiece string of id i; special_ids are (pad, eos, unk). Choose words
    by IDF with top_k (default RewardConfig.top_k) or threshold, not both; entities are always chosen.
    """
    mask = torch.zeros(prompt_ids.shape, dtype=torch.bool)  # [B, S]
    chosen = _important_words_per_prompt(prompt_ids, idf, pieces, special_ids, threshold, top_k, pad_id)
    for b, words in enumerate(chosen):
        for _, positions in words:
            mask[b, positions] = True
    return mask.to(prompt_ids.device)


def important_token_weights(
    prompt_ids: torch.Tensor, idf: dict[str, float], pieces: list[str], **options
) -> torch.Tensor:
    """§3.2's "weighting tokens in I_x according to their semantic importance", with IDF as the importance:
    float `[B, S]`, w_j = idf(word of j) on every piece of a chosen word (as important_token_mask, same
    options; an unseen word gets the largest IDF), 0 elsewhere."""
    weights = torch.zeros(prompt_ids.shape)  # [B, S]
    unseen = max(idf.values(), default=0.0)
    for b, words in enumerate(_important_words_per_prompt(prompt_ids, idf, pieces, **options)):
        for text, positions in words:
            weights[b, positions] = idf.get(_normalise(text), unseen)
    return weights.to(prompt_ids.device)


def important_words(
    prompt_ids: torch.Tensor, idf: dict[str, float], pieces: list[str], **options
) -> list[list[str]]:
    """The words behind important_token_mask (same options), per prompt and in order, for display."""
    return [
        [text.strip(string.punctuation) for text, _ in words]
        for words in _important_words_per_prompt(prompt_ids, idf, pieces, **options)
    ]


# ─── 3. Ā: the cross-attention the reward reads ───────────────────────────────────────────────────


def aggregate_layers(attn: torch.Tensor, last: int) -> torch.Tensor:
    """§3.2, Ā: Ā_{t,j} = (1/L') Σ_{ℓ=L−L'+1}^{L} A^{(ℓ)}_{t,j}, each A^{(ℓ)} averaged over heads.

    attn is `[L, B, H, T, S]` (per head) or `[L, B, T, S]` (heads already averaged); last = L'.
    """
    if attn.dim() not in (4, 5):
        raise ValueError(f"attn must be [L,B,H,T,S] or [L,B,T,S], got shape {tuple(attn.shape)}")
    if not 1 <= last <= attn.shape[0]:
        raise ValueError(f"last must be in 1..{attn.shape[0]} (the number of layers), got {last}")
    if attn.dim() == 5:
        attn = attn.mean(dim=2)  # [L, B, T, S]: mean over heads
    return attn[-last:].mean(dim=0)  # [B, T, S]: mean over the last L' layers


# ─── 4. The three terms of R(x, y) ────────────────────────────────────────────────────────────────

ROW_SUM_TOL = 1e-3


def _check_attention(attn: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Refuse inputs that would give a silently wrong reward (raw scores, wrong shapes)."""
    if attn.dim() != 3:
        raise ValueError(f"attn must be Ā [B,T,S], got shape {tuple(attn.shape)}")
    if response_mask.dtype != torch.bool or response_mask.shape != attn.shape[:2]:
        raise ValueError(
            f"response_mask must be bool [B,T] = {tuple(attn.shape[:2])}, "
            f"got {response_mask.dtype} {tuple(response_mask.shape)}"
        )
    lowest = attn.amin(dim=-1)  # [B, T]
    bad = response_mask & ~(lowest >= 0)  # ~(x >= 0) also catches NaN
    if bad.any():
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(
            f"attn must be non-negative and finite (got {lowest[b, t].item():.4g} at batch {b}, step {t}): "
            "pass softmax weights, not raw scores"
        )
    row_sum = attn.sum(dim=-1)  # [B, T]
    bad = response_mask & ~((row_sum - 1).abs() <= ROW_SUM_TOL)
    if bad.any():
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(
            f"attn rows must sum to 1 over the prompt (got {row_sum[b, t].item():.4g} at batch {b}, "
            f"step {t}): pass softmax weights, not raw scores"
        )


def _mean_over_response(per_step: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(1/|y|) Σ_t per_step[t] over real steps; 0 for an empty response (not 0/0)."""
    per_step = torch.where(response_mask, per_step, 0.0)  # [B, T]: padded rows may hold garbage
    length = response_mask.sum(dim=-1).clamp(min=1)  # [B]: |y|
    return per_step.sum(dim=-1) / length  # [B]


def coverage(attn: torch.Tensor, important: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """§3.2, coverage: coverage(x, y) = (1/(|y|·|I_x|)) Σ_{t=1}^{|y|} Σ_{j∈I_x} Ā_{t,j}.

    `important` is I_x as a bool mask `[B, S]`, or token weights w ≥ 0 (important_token_weights):
    then coverage = (1/(|y|·Σ_j w_j)) Σ_t Σ_j w_j Ā_{t,j}, which is the paper's for w = 1[j ∈ I_x].
    Lies in [0, 1/|I_x|] for a mask; 0 for an empty response or an empty I_x.
    """
    _check_attention(attn, response_mask)
    if not (important.dtype == torch.bool or important.is_floating_point()) or \
            important.shape != (attn.shape[0], attn.shape[2]):
        raise ValueError(
            f"important must be bool (or float weights) [B,S] = {(attn.shape[0], attn.shape[2])}, "
            f"got {important.dtype} {tuple(important.shape)}"
        )
    on_important = (attn * important.unsqueeze(1)).sum(dim=-1)  # [B, T]: Σ_j w_j Ā_{t,j}
    total = important.sum(dim=-1)  # [B]: |I_x|, or Σ_j w_j
    total = torch.where(total > 0, total, 1)
    return _mean_over_response(on_important, response_mask) / total  # [B]


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """§3.2, entropy: entropy(A_t) = −Σ_{j=1}^{|x|} Ā_{t,j} log Ā_{t,j}, with 0·log 0 = 0.

    `[B, T, S]` → `[B, T]`. Zero-weight (padded) prompt positions add nothing.
    """
    tiny = torch.finfo(attn.dtype).tiny  # log(tiny) is finite, so a weight of exactly 0 adds 0·log(tiny) = 0
    return -(attn * attn.clamp(min=tiny).log()).sum(dim=-1)  # [B, T]


def tempered(attn: torch.Tensor, temperature: float) -> torch.Tensor:
    """§3.2's "temperature scaling" of the attention: Ā^τ_{t,j} = Ā_{t,j}^(1/τ) / Σ_k Ā_{t,k}^(1/τ).

    τ > 1 flattens each row, τ < 1 sharpens it, τ = 1 leaves it; zero weights stay exactly 0.
    """
    powered = attn.pow(1.0 / temperature)
    return powered / powered.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(attn.dtype).tiny)


def focus(attn: torch.Tensor, response_mask: torch.Tensor, entropy_floor: float = RewardConfig.entropy_floor,
          temperature: float = RewardConfig.attention_temperature) -> torch.Tensor:
    """§3.2, focus, with the §6 entropy floor h: focus(x, y) = −(1/|y|) Σ_t max(entropy(A_t), h).

    With h = 0 this is the paper's focus exactly, in [−log(#real prompt tokens), 0]. A floor
    h > 0 is §6's "lower bound on entropy": attention sharper than h earns nothing more, so
    spiky attention cannot be used to hack the reward; focus ≤ −h. A temperature τ ≠ 1 reads the
    entropy of `tempered(Ā, τ)` instead.
    """
    _check_attention(attn, response_mask)
    if temperature != 1.0:
        attn = tempered(attn, temperature)
    entropy = attention_entropy(attn).clamp(min=entropy_floor)  # [B, T]; floor 0 also absorbs −1e-7 rounding
    return -_mean_over_response(entropy, response_mask)  # [B]


def repeat_penalty(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int = RewardConfig.ngram
                   ) -> torch.Tensor:
    """§3.2, repeatPenalty(y): the share of y's n-grams that already occurred earlier in y.

    repeatPenalty(y) = #{i : g_i = g_k for some k < i} / #{n-grams g_i of y}, in [0, 1]; an
    n-gram counts only if all its n tokens are real, and a response with no n-gram scores 0.
    """
    if response_ids.shape != response_mask.shape or response_mask.dtype != torch.bool:
        raise ValueError(
            f"response_ids [B,T] and a bool response_mask of the same shape are needed, got "
            f"{tuple(response_ids.shape)} and {response_mask.dtype} {tuple(response_mask.shape)}"
        )
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    B, T = response_ids.shape
    if T < n:
        return torch.zeros(B, device=response_ids.device)
    K = T - n + 1  # n-gram g_i = (y_i, …, y_{i+n−1}) for i < K
    real = response_mask.unfold(1, n, 1).all(dim=-1)  # [B, K]
    same = real.unsqueeze(1).expand(B, K, K).clone()  # [B, i, k]: only real n-grams g_k can be matched
    for offset in range(n):  # g_i == g_k ⇔ equal at every offset (a loop over n, not over B or T)
        ids = response_ids[:, offset : offset + K]  # [B, K]
        same &= ids.unsqueeze(2) == ids.unsqueeze(1)
    earlier = torch.ones(K, K, dtype=torch.bool, device=response_ids.device).tril(-1)  # [K, K]: k < i
    repeated = (same & earlier).any(dim=-1) & real  # [B, K]
    return repeated.sum(dim=-1) / real.sum(dim=-1).clamp(min=1)  # [B]


class RewardBreakdown(NamedTuple):
    """R(x, y) and its three terms, each `[B]` (logged separately, and used by the ablations)."""

    total: torch.Tensor
    coverage: torch.Tensor
    focus: torch.Tensor
    repeat: torch.Tensor


def cagsr_reward(
    attn: torch.Tensor,
    important: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    alpha: float = RewardConfig.alpha,
    beta: float = RewardConfig.beta,
    gamma: float = RewardConfig.gamma,
    entropy_floor: float = RewardConfig.entropy_floor,
    n: int = RewardConfig.ngram,
    temperature: float = RewardConfig.attention_temperature,
    length_bonus: float = RewardConfig.length_bonus,
) -> RewardBreakdown:
    """§3.2, R: R(x, y) = α·coverage(x, y) + β·focus(x, y) − γ·repeatPenalty(y) (+ λ·|y| with a length bonus λ).

    The defaults are RewardConfig's, the paper's α = 1.0, β = 0.5, γ = 1.0 (§5, grid search) and no length
    bonus; attn is Ā `[B, T, S]`; `important` a mask or weights (see coverage).
    """
    if response_ids.shape != response_mask.shape:
        raise ValueError(
            f"response_ids {tuple(response_ids.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    cov = coverage(attn, important, response_mask)  # [B]
    foc = focus(attn, response_mask, entropy_floor, temperature)  # [B]
    rep = repeat_penalty(response_ids, response_mask, n).to(attn.dtype)  # [B]
    total = alpha * cov + beta * foc - gamma * rep
    if length_bonus:
        total = total + length_bonus * response_mask.sum(dim=-1).to(total.dtype)
    return RewardBreakdown(total, cov, foc, rep)


def worked_example() -> dict[str, torch.Tensor]:
    """A 4-token prompt, a 3-token response and I_x = {0, 1}: small enough to check by hand.

    `cagsr_reward(**worked_example())` gives coverage 5/12, focus −log 2, repeat 1/2 (see the
    tests and the tutorial for the arithmetic).
    """
    attn = torch.tensor(
        [[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64
    )  # [1, 3, 4]
    return {
        "attn": attn,
        "important": torch.tensor([[True, True, False, False]]),  # [1, 4]: I_x = {0, 1}
        "response_ids": torch.tensor([[7, 7, 7]]),  # [1, 3]: bigrams (7,7), (7,7): the second repeats
        "response_mask": torch.tensor([[True, True, True]]),  # [1, 3]
    }


# ─── 5. The reward the RL loop calls ──────────────────────────────────────────────────────────────


class AttentionReward:
    """R(x, y) of §3.2 for a whole rollout: I_x of each prompt, then `cagsr_reward` on the Ā that the
    sampling pass recorded (no second forward pass, no gradient). The ablations of §7.6 set a weight to 0."""

    def __init__(self, idf: dict[str, float], pieces: list[str], special_ids=SPECIAL_IDS, cfg=RewardConfig()):
        self.idf, self.pieces, self.special_ids, self.top_k = idf, pieces, tuple(special_ids), cfg.top_k
        self.importance = important_token_weights if cfg.idf_weighted else important_token_mask
        self.weights = {"alpha": cfg.alpha, "beta": cfg.beta, "gamma": cfg.gamma, "entropy_floor": cfg.entropy_floor,
                        "n": cfg.ngram, "temperature": cfg.attention_temperature, "length_bonus": cfg.length_bonus}

    def __call__(self, rollout, src: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """rollout: tokens/mask [B·N,T], cross_attn [B·N,T,S]; src [B,S] -> R [B·N] and its terms."""
        n = rollout.tokens.shape[0] // src.shape[0]
        important = self.importance(src.cpu(), self.idf, self.pieces, special_ids=self.special_ids,
                                    top_k=self.top_k, pad_id=self.special_ids[0])
        important = important.to(src.device).repeat_interleave(n, dim=0)  # [B·N,S]
        r = cagsr_reward(rollout.cross_attn, important, rollout.tokens, rollout.mask, **self.weights)
        entropy = attention_entropy(rollout.cross_attn)  # [B·N,T]
        below = (entropy < self.weights["entropy_floor"]).float()  # steps the §6 floor props up
        return r.total, {"coverage": r.coverage, "focus": r.focus, "repeat": r.repeat,
                         "attn_entropy": _mean_over_response(entropy, rollout.mask),
                         "below_floor": _mean_over_response(below, rollout.mask)}


def reward_for(run: Path, tok, cfg: RewardConfig) -> AttentionReward:
    """The CAGSR reward of §3.2 with the run directory's IDF table (written by `python cagsr.py prepare`)."""
    try:
        idf = load_idf(run / "idf.json")
    except (OSError, ValueError):
        raise CLIError(f"{run / 'idf.json'} is missing or corrupt: run `python cagsr.py prepare`")
    return AttentionReward(idf, tok.pieces, (tok.pad_id, tok.eos_id, tok.unk_id), cfg)
