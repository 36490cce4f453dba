"""The baselines of §7.3 and the registry of methods: each method's name, its reward, and the training
of the learned reward models two of them use.

    METHODS, reward_for_method   name → the reward an RL run of that method optimises
    PreferenceRewardModel        "a small reward model": the SFT Transformer + a scalar head
    synthetic labels             Synthetic Preference RL: references vs. automatic corruptions (BCE)
    human preference pairs       Human Preference RL (Limited): oracle preferences with §2.2's flips (Bradley–Terry)
    LearnedReward, SumReward     a learned reward for the RL loop, and §9's hybrid with the CAGSR reward

The preference labels come from the simulated oracle of evaluate.py. Both reward models start from the
policy's own SFT Transformer.
"""
import copy
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

import evaluate
import relevance
from data import DATASETS, load_split
from data.tokenizer import tokenizer_for
from model import Transformer
from reward import RewardConfig, reward_for
from rundir import CLIError, atomic_save, load_model

# ---- the methods -------------------------------------------------------------------------------

METHODS = ("no-rl", "synthetic-pref", "cagsr", "human-pref", "cagsr-no-coverage", "cagsr-no-focus",
           "cagsr-no-repeat", "hybrid")
ABLATIONS = {"cagsr-no-coverage": {"alpha": 0.0}, "cagsr-no-focus": {"beta": 0.0}, "cagsr-no-repeat": {"gamma": 0.0}}
HYBRID_WEIGHT = 1.0  # R = R_CAGSR + 1.0 · R_human-pref (the learned reward is normalised on references)


@dataclass(frozen=True)
class RewardModelConfig:
    rm_steps: int = 150  # most training steps of a learned reward model (it stops when held-out accuracy stalls)
    rm_eval_every: int = 25  # steps between two measurements of the held-out accuracy
    rm_patience: int = 2  # measurements without a gain before training stops; the best measured weights are kept
    human_prompts: int = 1000  # training prompts of the human-preference model (§7.3's 1,000), 2 samples each
    synthetic_prompts: int = 300  # training prompts per data set of the synthetic-preference model
    held_out_prompts: int = 250  # validation prompts per data set whose labels both models never train on


def reward_for_method(method: str, run: Path, rcfg: RewardConfig, rmcfg: RewardModelConfig, data: Path, rt,
                      seed: int = 0):
    """The reward each method of §7.3/§7.6 optimises (the hybrid is §6/§9's future work)."""
    tok = tokenizer_for(run)
    if method == "cagsr" or method in ABLATIONS:
        return reward_for(run, tok, replace(rcfg, **ABLATIONS.get(method, {})))
    if method == "synthetic-pref":
        return learned_reward("synthetic", run, rmcfg, data, rt, seed)
    if method == "human-pref":
        return learned_reward("human", run, rmcfg, data, rt, seed)
    if method == "hybrid":
        return SumReward(reward_for(run, tok, rcfg), learned_reward("human", run, rmcfg, data, rt, seed), HYBRID_WEIGHT)
    raise CLIError(f"unknown method {method!r}; choose one of {', '.join(METHODS[1:])}")


def learned_reward(kind: str, run: Path, rmcfg: RewardModelConfig, data: Path, rt, seed: int = 0) -> "LearnedReward":
    """A §7.3 reward model (trained on first use, by rank 0), normalised on 256 training references."""
    path, tok = run / f"rm-{kind}.pt", tokenizer_for(run)
    if rt.main:
        train_reward_model(kind, run, rmcfg, data, rt.device, seed)
    rt.barrier()
    sft_model = load_model(run / "sft.pt", rt.device)
    rm = load_reward_model(path, lambda: Transformer(sft_model.cfg)).to(rt.device).eval()
    refs = [(r["prompt"], r["response"]) for d in DATASETS for r in load_split(d, "train", data)[:128]]
    return LearnedReward(rm, tok, refs)


def train_reward_model(kind: str, run: Path, rmcfg: RewardModelConfig, data: Path, device="cpu", seed=0) -> Path:
    """§7.3 baselines' reward models from SFT samples, once per run directory.
    synthetic: good = references and SFT samples that pass automatic checks, bad = corruptions;
    human: rmcfg.human_prompts training prompts × 2 SFT samples (temperature 1.5), preferred by the
    simulated oracle, 15 % flipped (§2.2), ties dropped.
    Both are measured on labels made the same way from validation prompts (the human pairs unflipped:
    agreement with the oracle), which also choose when training stops (`fit`); the file keeps the result."""
    path = run / f"rm-{kind}.pt"
    if path.exists():
        return path
    tok = tokenizer_for(run)
    sft_model, rng = load_model(run / "sft.pt", device), random.Random(seed)
    rm = PreferenceRewardModel(sft_model)

    def sample(records, temperature=1.0):
        return evaluate.answers(sft_model, tok, [r["prompt"] for r in records], False, temperature, device=device)

    validation = {d: load_split(d, "validation", data) for d in DATASETS}
    held_out = {d: records[: rmcfg.held_out_prompts] for d, records in validation.items()}
    if kind == "synthetic":  # labelled per data set: a corruption borrows from records of the same one
        examples, test = [], []
        for d in DATASETS:
            records = rng.sample(load_split(d, "train", data), rmcfg.synthetic_prompts)
            examples += synthetic_labels(records, sample(records), rng)
            test += synthetic_labels(held_out[d], sample(held_out[d]), rng, pool=validation[d])
        fit = train_classifier_rm(rm, tok, examples, rmcfg, lr=3e-4, seed=seed, held_out=test)
        size = f"{len(examples)} labelled responses"
    else:
        records = rng.sample([r for d in DATASETS for r in load_split(d, "train", data)], rmcfg.human_prompts)
        # at temperature 1 our near-deterministic SFT policy gives two equally good answers to 9 prompts
        # in 10 and the oracle has nothing to prefer; at 1.5 about 4 pairs in 10 differ
        pairs = human_preference_pairs(records, sample(records, 1.5), sample(records, 1.5), flip=0.15, rng=rng)
        held_out = [r for d in DATASETS for r in held_out[d]]
        test = human_preference_pairs(held_out, sample(held_out, 1.5), sample(held_out, 1.5), flip=0.0, rng=rng)
        if not pairs:
            raise CLIError(f"the SFT model's samples of {len(records)} prompts gave no preference pair (the oracle "
                           "ties them all): use more --human-prompts")
        fit = train_bradley_terry_rm(rm, tok, pairs, rmcfg, lr=3e-4, seed=seed, held_out=test)
        size = f"{len(pairs)} preference pairs (ties dropped)"
    save_reward_model(rm, path, {"accuracy": fit.accuracy, "items": len(test), "step": fit.step})
    what = "pairs" if kind == "human" else "labels"
    held = (f"held-out accuracy {fit.accuracy:.1%} on {len(test)} validation {what} (measured "
            f"{', '.join(f'{a:.1%} at step {s}' for s, a in fit.history)}; kept step {fit.step})") if test else \
        f"no held-out {what} (the oracle ties every validation pair): trained {len(fit.losses)} steps"
    print(f"reward model {kind}: {size}, loss {fit.losses[0]:.3f} -> "
          f"{sum(fit.losses[-10:]) / len(fit.losses[-10:]):.3f}; {held} -> {path}")
    return path


# ---- the reward model ----------------------------------------------------------------------------


def final_decoder_states(model: Transformer, src: torch.Tensor, dec_in: torch.Tensor) -> torch.Tensor:
    """§7.3 reward-model body: the final, normalised decoder states of a teacher-forced pass (no logits).

    src [B,S], dec_in [B·N,T] (start token + response; N rows per prompt) -> [B·N,T,D].
    """
    memory, src_mask = model.encode(src)  # [B,S,D], [B,1,1,S]
    return model.dec_norm(model.decoder_states(memory, src_mask, dec_in)[0])  # [B·N,T,D]


class PreferenceRewardModel(nn.Module):
    """§7.3 "a small reward model": a copy of the SFT Transformer + a linear head -> scalar r(x, y)."""

    def __init__(self, policy: Transformer):
        super().__init__()
        self.body = copy.deepcopy(policy)  # starts from the SFT policy: it already reads prompts and answers
        self.head = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.head.weight)  # r ≡ 0 at first: the BT/BCE loss starts at log 2
        nn.init.zeros_(self.head.bias)

    def forward(self, src: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """§7.3 r(x, y): src [B,S], tokens and mask [B·N,T] (response incl. EOS) -> [B·N]."""
        start = torch.full_like(tokens[:, :1], self.body.cfg.pad_id)
        h = final_decoder_states(self.body, src, torch.cat([start, tokens], dim=1))[:, 1:]  # [B·N,T,D]: states at y_t
        # Masked mean, not the last token's state: every response position then gets a gradient, and in
        # a 60-step budget it separated references from loops/truncations better (0.94 vs 0.89 held out).
        m = mask.unsqueeze(-1).to(h.dtype)  # [B·N,T,1]
        return self.head((h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).squeeze(-1)  # [B·N]


def encode_texts(tok, prompts: list[str], responses: list[str], max_len: int):
    """§7.3 RM input: texts -> src [B,S], tokens [B,T] (response + EOS, cut to max_len), mask [B,T]."""
    src = pad_sequence([torch.tensor(tok.encode(p)) for p in prompts], batch_first=True, padding_value=tok.pad_id)
    ys = [torch.tensor(tok.encode(r)[:max_len]) for r in responses]
    tokens = pad_sequence(ys, batch_first=True, padding_value=tok.pad_id)  # [B,T]
    mask = torch.arange(tokens.shape[1]) < torch.tensor([len(y) for y in ys])[:, None]  # [B,T]
    return src, tokens, mask


def score_texts(rm: PreferenceRewardModel, tok, prompts: list[str], responses: list[str], batch_size=128):
    """§7.3 r(x, y) of text pairs, without gradient -> [len(prompts)]."""
    device = next(rm.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = slice(i, i + batch_size)
            batch = encode_texts(tok, prompts[chunk], responses[chunk], rm.body.cfg.max_len)
            out.append(rm(*(t.to(device) for t in batch)).cpu())
    return torch.cat(out)


# Synthetic Preference RL: automatic labels. A "bad" response is a reference (or SFT sample) broken
# in one of the ways a policy fails: word salad, stopping early, looping, a wrong fact, another topic.
CORRUPTIONS = ("shuffled", "truncated", "repeated", "wrong_entity", "off_topic")


def _swap_words(text: str, old: list[str], new: list[str]) -> str:
    """Replace each whole word old[i] (any case) by new[i], keeping a leading capital."""
    for o, n in zip(old, new):
        word = rf"(?<!\w){re.escape(o)}(?!\w)"
        text = re.sub(word, lambda m, n=n: n[:1].upper() + n[1:] if m[0][0].isupper() else n, text, flags=re.I)
    return text


def corrupt(response: str, record: dict, kind: str, rng: random.Random, pool: list[dict]) -> str:
    """§7.3 synthetic "bad" response of one `kind`; `pool` supplies other records' facts and references."""
    words = response.split()
    if kind == "shuffled":
        shuffled = words[:]
        while shuffled == words and len(set(words)) > 1:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    if kind == "truncated":  # a strict prefix: the text up to the end of the first third of its words
        return response[: list(re.finditer(r"\S+", response))[max(1, len(words) // 3) - 1].end()]
    if kind == "repeated":  # a decoding loop: a 3-word phrase, then it again ≥ 3 times (a third of |y|)
        start = rng.randrange(max(1, len(words) - 2))
        return " ".join(words[: start + 3] + words[start : start + 3] * max(3, len(words) // 3))
    if kind == "wrong_entity":
        if "fact" in record:
            others = [r["fact"] for r in pool if r["category"] == record["category"]
                      and not evaluate.states_fact(r["fact"], record["fact"])]
            return _swap_words(response, [record["fact"]], [rng.choice(others)])
        ours = {w.lower() for w in record["required"]}
        others = [r["required"] for r in pool if r["topic"] != record["topic"] and len(r["required"])
                  == len(record["required"]) and not ours & {w.lower() for w in r["required"]}]
        return _swap_words(response, record["required"], rng.choice(others))
    if kind == "off_topic":
        return rng.choice([r for r in pool if relevance.off_topic(record, r)])["response"]
    raise ValueError(f"unknown corruption {kind!r}; choose from {', '.join(CORRUPTIONS)}")


def passes_checks(response: str, record: dict) -> bool:
    """§7.3 automatic "good" label: not degenerate, and states the fact (QA) / ≥ half the required items."""
    if evaluate.degenerate(response, record):
        return False
    if "fact" in record:
        return evaluate.states_fact(response, record["fact"])
    return 2 * sum(evaluate.states_fact(response, w) for w in record["required"]) >= len(record["required"])


def synthetic_labels(records: list[dict], samples: list[str] | None, rng: random.Random,
                     kinds: tuple[str, ...] = CORRUPTIONS, pool: list[dict] | None = None) -> list[tuple[str, str, int]]:
    """§7.3 Synthetic Preference data: (prompt, response, 1 good / 0 bad), one corruption per good text.

    Good: every reference, and samples[i] (an SFT sample for records[i]) when it passes the checks;
    a failing sample is dropped, not labelled bad, so labels stay balanced and bad means "corrupted".
    Corruptions borrow other facts and texts from `pool` (default: the records themselves).
    """
    out = []
    for i, record in enumerate(records):
        goods = [record["response"]] + ([samples[i]] if samples and passes_checks(samples[i], record) else [])
        for good in goods:
            bad = corrupt(good, record, rng.choice(kinds), rng, pool or records)
            out += [(record["prompt"], good, 1), (record["prompt"], bad, 0)]
    return out


def human_preference_pairs(records: list[dict], samples_a: list[str], samples_b: list[str], flip: float = 0.15,
                           *, rng: random.Random) -> list[tuple[str, str, str]]:
    """§7.3 Human Preference (Limited) data with §2.2's disagreement: (prompt, chosen, rejected) per record.

    The simulated annotator prefers the higher oracle score; a tie says nothing and is dropped; each
    kept label is then flipped with probability `flip`.
    """
    pairs = []
    for record, a, b in zip(records, samples_a, samples_b, strict=True):
        sa, sb = evaluate.oracle_score(a, record), evaluate.oracle_score(b, record)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if (sa > sb) != (rng.random() < flip) else (b, a)
        pairs.append((record["prompt"], chosen, rejected))
    return pairs


@dataclass
class Fit:
    """What reward-model training did: every step's loss and, with held-out data, the measured accuracies
    [(step, accuracy)], the best of them and the step whose weights were kept."""
    losses: list[float]
    history: list[tuple[int, float]]
    accuracy: float = float("nan")
    step: int = 0


def fit(rm: PreferenceRewardModel, n: int, batch_loss, accuracy, cfg: RewardModelConfig, batch_size: int, lr: float,
        seed: int) -> Fit:
    """§7.3 reward-model training loop: AdamW on batch_loss(indices) over random batches of n items, at most
    cfg.rm_steps steps. With `accuracy` (rm -> accuracy on data it never trains on), measured every
    cfg.rm_eval_every steps: training stops after cfg.rm_patience measurements without a gain, and the
    weights of the best measurement are kept — validation decides when to stop, not a loss that keeps falling."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(rm.parameters(), lr=lr)
    out, best, stalled = Fit([], []), None, 0
    for step in range(1, cfg.rm_steps + 1):
        loss = batch_loss(torch.randint(n, (min(batch_size, n),), generator=gen).tolist())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.losses.append(loss.item())
        if accuracy and (step % cfg.rm_eval_every == 0 or step == cfg.rm_steps):
            out.history.append((step, accuracy(rm)))
            if best is None or out.history[-1][1] > out.accuracy:
                out.accuracy, out.step, stalled = out.history[-1][1], step, 0
                best = copy.deepcopy(rm.state_dict())
            else:
                stalled += 1
                if stalled >= cfg.rm_patience:
                    break
    if best is not None:
        rm.load_state_dict(best)
    return out


def label_accuracy(rm: PreferenceRewardModel, tok, examples: list[tuple[str, str, int]]) -> float:
    """Share of (prompt, response, label) whose r(x, y) > 0 exactly when the label is 1 (good)."""
    r = score_texts(rm, tok, [p for p, _, _ in examples], [y for _, y, _ in examples])
    return sum((s > 0) == (label == 1) for s, (_, _, label) in zip(r.tolist(), examples)) / len(examples)


def pair_accuracy(rm: PreferenceRewardModel, tok, pairs: list[tuple[str, str, str]]) -> float:
    """Share of (prompt, chosen, rejected) with r(x, chosen) > r(x, rejected)."""
    prompts = [p for p, _, _ in pairs]
    chosen, rejected = (score_texts(rm, tok, prompts, [pair[i] for pair in pairs]) for i in (1, 2))
    return (chosen > rejected).float().mean().item()


def train_classifier_rm(rm: PreferenceRewardModel, tok, examples: list[tuple[str, str, int]],
                        cfg: RewardModelConfig = RewardModelConfig(), batch_size=32, lr=3e-4, seed=0,
                        held_out: list[tuple[str, str, int]] | None = None) -> Fit:
    """§7.3 Synthetic Preference RM: binary cross-entropy with r(x, y) as the logit of "good"; stopped on
    the label accuracy of `held_out` when given."""
    device = next(rm.parameters()).device

    def batch_loss(idx):
        prompts, responses, labels = zip(*(examples[i] for i in idx))
        batch = encode_texts(tok, prompts, responses, rm.body.cfg.max_len)
        r = rm(*(t.to(device) for t in batch))  # [b]
        return F.binary_cross_entropy_with_logits(r, torch.tensor(labels, dtype=r.dtype, device=device))

    accuracy = (lambda m: label_accuracy(m, tok, held_out)) if held_out else None
    return fit(rm, len(examples), batch_loss, accuracy, cfg, batch_size, lr, seed)


def train_bradley_terry_rm(rm: PreferenceRewardModel, tok, pairs: list[tuple[str, str, str]],
                           cfg: RewardModelConfig = RewardModelConfig(), batch_size=32, lr=3e-4, seed=0,
                           held_out: list[tuple[str, str, str]] | None = None) -> Fit:
    """§7.3 Human Preference RM (Bradley–Terry): loss = −log σ(r(x, y_chosen) − r(x, y_rejected)); stopped
    on the pair accuracy of `held_out` when given."""
    device = next(rm.parameters()).device

    def batch_loss(idx):
        prompts, chosen, rejected = zip(*(pairs[i] for i in idx))
        batch = encode_texts(tok, prompts * 2, chosen + rejected, rm.body.cfg.max_len)  # [2b, ·]
        r = rm(*(t.to(device) for t in batch))  # [2b]: chosen rows, then rejected rows
        return -F.logsigmoid(r[: len(idx)] - r[len(idx) :]).mean()

    accuracy = (lambda m: pair_accuracy(m, tok, held_out)) if held_out else None
    return fit(rm, len(pairs), batch_loss, accuracy, cfg, batch_size, lr, seed)


class LearnedReward:
    """§7.3 baselines' reward for the RL loop: R = (r(x, y) − μ)/σ, μ and σ fixed on the references.

    Normalising once (not per batch) keeps R on the CAGSR reward's scale for PPO and the hybrid, while a
    better policy still earns more. Without references, μ = 0 and σ = 1.
    """

    def __init__(self, rm: PreferenceRewardModel, tok=None, references: list[tuple[str, str]] | None = None):
        self.rm, self.mean, self.std = rm, 0.0, 1.0
        if references:
            r = score_texts(rm, tok, *map(list, zip(*references)))  # [len(references)]
            self.mean, self.std = r.mean().item(), r.std(correction=0).clamp(min=1e-6).item()

    def __call__(self, rollout, src: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """rollout: tokens/mask [B·N,T]; src [B,S] (each prompt once) -> R [B·N] and {"rm": R}."""
        with torch.no_grad():
            r = (self.rm(src, rollout.tokens, rollout.mask) - self.mean) / self.std  # [B·N]
        return r, {"rm": r}


class SumReward:
    """§9 hybrid: R = R_CAGSR + weight · R_learned; the terms of both are logged."""

    def __init__(self, attention_reward, learned_reward, weight: float = 1.0):
        self.attention_reward, self.learned_reward, self.weight = attention_reward, learned_reward, weight

    def __call__(self, rollout, src: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """rollout, src as for AttentionReward -> R [B·N] and the union of both rewards' terms."""
        r_att, terms_att = self.attention_reward(rollout, src)
        r_rm, terms_rm = self.learned_reward(rollout, src)
        return r_att + self.weight * r_rm, {**terms_att, **terms_rm}


def save_reward_model(rm: PreferenceRewardModel, path, held_out: dict | None = None) -> None:
    """§7.3 reward model to disk atomically (rundir.atomic_save), with its held-out accuracy if measured."""
    atomic_save({"state": rm.state_dict(), **({"held_out": held_out} if held_out else {})}, Path(path))


def load_reward_model(path, base_model_factory) -> PreferenceRewardModel:
    """§7.3 reward model from disk; base_model_factory() builds a Transformer of the saved shape."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        rm = PreferenceRewardModel(base_model_factory())
        rm.load_state_dict(ckpt["state"])
    except Exception as e:  # missing, truncated, foreign, or of another shape
        raise ValueError(f"{path}: not a reward model of this project ({type(e).__name__})") from None
    return rm
