"""CAGSR from the command line: prepare → supervised fine-tuning → reinforcement → evaluation.

    python cagsr.py --size tiny          # the whole pipeline; a rerun reuses finished stages
    python cagsr.py sft --size tiny      # one stage; `python cagsr.py SUBCOMMAND --help` for its flags

Every output goes to runs/<size>/ (or --out DIR): config.json, metrics.jsonl, checkpoints, PNG plots.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
import runtime
from runtime import GPUS, memory_plan
from data import DATA_DIR, DATASETS, SPLITS, DataError, format_stats, length_stats, load_split
from data.tokenizer import Tokenizer, train_tokenizer, training_texts
from model import PRESETS, Transformer
from ppo import ActorCritic, AdaptiveKL, PPOConfig, ValueHead, collect_rollout, explained_variance, ppo_update
from reward import (AttentionReward, LearnedReward, PreferenceRewardModel, SumReward, fit_idf, human_preference_pairs,
                    load_idf, load_reward_model, save_idf, save_reward_model, synthetic_labels,
                    train_bradley_terry_rm, train_classifier_rm)

# ---- training configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at lr · min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_pairs: int = 512  # validation pairs scored at each evaluation


SFT_PRESETS = {
    "tiny": SFTConfig(),
    "small": SFTConfig(steps=6000, lr=5e-4),
    "base": SFTConfig(steps=10000, lr=3e-4),
    "large": SFTConfig(steps=10000, lr=1e-4),
    "1.3b": SFTConfig(steps=10000, lr=5e-5),
}


class CLIError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2."""


# ---- small utilities: files that survive interruption -------------------------------------------


def atomic_save(obj, path: Path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise CLIError(f"checkpoint {path} not found: run the stage that writes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or foreign objects
        raise CLIError(f"checkpoint {path} is corrupt ({type(e).__name__}); delete it and rerun the stage")


def load_model(path: Path, device="cpu") -> Transformer:
    ckpt = load_checkpoint(path)
    try:
        model = Transformer(replace(PRESETS[ckpt["size"]], **ckpt["model_overrides"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise CLIError(f"checkpoint {path} does not hold a model of this project ({type(e).__name__})")
    return model.to(device)


class Metrics:
    """metrics.jsonl: one JSON object per logged step, appended and flushed as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self, stage=None) -> list[dict]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if stage is None or r["stage"] == stage]

    def truncate(self, stage: str, after_step: int):
        """Forget rows of `stage` logged after `after_step`: a resumed run logs them again."""
        keep = [r for r in self.read() if r["stage"] != stage or r["step"] <= after_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


# ---- data → tensors -------------------------------------------------------------------------


def tokenizer_for(run: Path) -> Tokenizer:
    return Tokenizer(run / "tokenizer.model")


def encode_pairs(tok: Tokenizer, records: list[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per record; a prompt or response too long is an error."""
    pairs = []
    for r in records:
        src, tgt = tok.encode(r["prompt"]), tok.encode(r["response"], eos=True)
        if len(src) > max_len or len(tgt) > max_len:
            raise CLIError(f"record {r['id']} has {max(len(src), len(tgt))} tokens; the model takes {max_len}")
        pairs.append((src, tgt))
    return pairs


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad to the longest sequence: [B, max len]."""
    out = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def batch(pairs, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """src [B,S], decoder input BOS + y [B,T], targets y + EOS [B,T] (pad where there is none)."""
    src = pad([p for p, _ in pairs], cfg.pad_id)
    tgt = pad([y for _, y in pairs], cfg.pad_id)
    dec_in = torch.cat([torch.full((len(pairs), 1), cfg.bos_id), tgt[:, :-1]], dim=1)
    return src, dec_in, tgt


def sequence_nll(model, src, dec_in, tgt, pad_id: int) -> torch.Tensor:
    """Summed negative log-likelihood of each target sequence: [B]."""
    logits, _ = model(src, dec_in)
    nll = F.cross_entropy(logits.float().transpose(1, 2), tgt, ignore_index=pad_id, reduction="none")
    return nll.sum(dim=1)


@torch.no_grad()
def perplexity(model, pairs, batch_size=128, device="cpu") -> float:
    """exp(mean NLL per target token, EOS included) over `pairs`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        src, dec_in, tgt = (t.to(device) for t in batch(pairs[i : i + batch_size], model.cfg))
        total += sequence_nll(model, src, dec_in, tgt, model.cfg.pad_id).sum().item()
        count += (tgt != model.cfg.pad_id).sum().item()
    return math.exp(total / count)


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


# ---- stage 1: prepare ----------------------------------------------------------------------


def prepare(args) -> Path:
    """Load and check the data sets, train the tokenizer on the training split, print length statistics."""
    run = args.run
    run.mkdir(parents=True, exist_ok=True)
    records = {d: {s: load_split(d, s, args.data) for s in SPLITS} for d in DATASETS}
    path = run / "tokenizer.model"
    if not path.exists():
        train_tokenizer(training_texts(args.data), PRESETS[args.size].vocab_size, path)
    tok = Tokenizer(path)
    print(f"tokenizer: {tok.vocab_size} pieces, trained on the training split -> {path}")
    if not (run / "idf.json").exists():  # I_x of §3.2 needs word IDFs over the training prompts
        save_idf(fit_idf([r["prompt"] for d in records.values() for r in d["train"]]), run / "idf.json")
    print(format_stats(length_stats([r for d in records.values() for s in d.values() for r in s], tok)))
    return path


# ---- stage 2: supervised fine-tuning (the paper's No-RL baseline, §7.3) ------------------------


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warmup, then cosine decay from lr to lr · min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sft(args) -> Path:
    """Cross-entropy fine-tuning with AdamW; writes sft.pt, the No-RL baseline and RL's starting policy."""
    run, final = args.run, args.run / "sft.pt"
    if final.exists() and not args.force:
        print(f"sft: reusing {final}")
        return final
    check_resume(run / "sft-last.pt", args)
    tok = tokenizer_for(run)
    mcfg = replace(PRESETS[args.size], pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    # --steps/--batch-size/--lr belong to the `sft` subcommand; in the pipeline, --lr is RL's
    cfg = overrides(SFT_PRESETS[args.size], args) if args.command == "sft" else SFT_PRESETS[args.size]
    train = encode_pairs(tok, [r for d in DATASETS for r in load_split(d, "train", args.data)], mcfg.max_len)
    val = encode_pairs(tok, [r for d in DATASETS for r in load_split(d, "validation", args.data)], mcfg.max_len)
    val = val[:: max(1, len(val) // cfg.eval_pairs)][: cfg.eval_pairs]
    if args.rt.main:
        config = {"size": args.size, "model": asdict(mcfg), "sft": asdict(cfg)}
        atomic_write_text(run / "config.json", json.dumps(config, indent=2))
    rt = args.rt
    model, metrics = train_sft(mcfg, cfg, train, val, run, args.seed, rt, size=args.size)
    state = rt.model_state(model)
    if rt.main:
        atomic_save(checkpoint(model, args.size, state), final)
        plot_curves(metrics.read("sft"), ["loss", "val_loss"], run / "sft_loss.png", "supervised fine-tuning")
        print(f"sft: wrote {final} and {run / 'sft_loss.png'}")
    rt.barrier()
    return final


def checkpoint(model: Transformer, size: str, state=None, **extra) -> dict:
    """What load_model reads back: the preset, the config fields that differ from it, the weights
    (`state`, default model.state_dict()), and any `extra` entries of a resumable checkpoint."""
    overrides = {k: v for k, v in asdict(model.cfg).items() if getattr(PRESETS[size], k) != v}
    return {"size": size, "model_overrides": overrides, "model": model.state_dict() if state is None else state,
            **extra}


def epoch_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled batches in which pairs of similar length travel together, so little of
    each batch is padding: shuffle, sort within windows of 16 batches, then shuffle the batches."""
    perm, window = torch.randperm(len(lengths), generator=gen), 16 * batch_size
    chunks = [perm[i : i + window] for i in range(0, len(perm), window)]
    ordered = torch.cat([c[lengths[c].argsort(stable=True)] for c in chunks])
    batches = list(ordered[: len(ordered) // batch_size * batch_size].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen)]


def train_sft(mcfg, cfg: SFTConfig, train, val, run: Path, seed=0, rt=None, size="tiny", quiet=False):
    """The training loop. Every `eval_every` steps: validation loss/perplexity, and a resumable
    checkpoint (sft-last.pt: model, optimizer, step, data order RNG) so an interrupted run continues.
    `rt` (runtime.Runtime) places the model; in a distributed run each rank takes an equal slice of
    every global batch of `cfg.batch_size` pairs. Returns the trained model and the metrics file."""
    rt = rt or runtime.setup()
    if cfg.batch_size % rt.world:
        raise CLIError(f"--batch-size {cfg.batch_size} does not split evenly over {rt.world} processes")
    torch.manual_seed(seed)
    run.mkdir(parents=True, exist_ok=True)
    model = Transformer(mcfg)
    order = torch.Generator().manual_seed(seed)
    metrics, last, step = Metrics(run / "metrics.jsonl"), run / "sft-last.pt", 0
    lengths = torch.tensor([len(x) + len(y) for x, y in train])
    batches, pos = epoch_batches(lengths, cfg.batch_size, order), 0
    ck = load_checkpoint(last) if last.exists() else None
    if ck:
        model.load_state_dict(ck["model"])
    model = rt.prepare(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    if ck:
        rt.load_optimizer_state(model, opt, ck["optimizer"])
        order.set_state(ck["order"])
        step, batches, pos = ck["step"], ck["batches"], ck["pos"]
        if rt.main:
            print(f"sft: resuming from step {step} ({last})")
    if rt.main:
        metrics.truncate("sft", step)
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", disable=quiet or not rt.main, dynamic_ncols=True)
    while step < cfg.steps:
        if pos == len(batches):  # a fresh shuffle each epoch
            batches, pos = epoch_batches(lengths, cfg.batch_size, order), 0
        mine = batches[pos][rt.rank :: rt.world]  # this process's slice of the global batch
        src, dec_in, tgt = (t.to(rt.device) for t in batch([train[i] for i in mine], mcfg))
        pos += 1
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with rt.autocast():
            nll = sequence_nll(model, src, dec_in, tgt, mcfg.pad_id).sum()
        # this rank's part of the mean over every rank's target tokens; DDP/FSDP average the ranks'
        # gradients, hence the factor `world` (1 in one process)
        loss = nll / rt.all_sum((tgt != mcfg.pad_id).sum())
        opt.zero_grad(set_to_none=True)
        (loss * rt.world).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        loss = rt.all_sum(loss.detach())
        if not torch.isfinite(loss):
            raise CLIError(f"sft: loss became {loss.item()} at step {step}; last good checkpoint: {last}")
        opt.step()
        step += 1
        row = {"stage": "sft", "step": step, "loss": loss.item(), "lr": lr_at(step - 1, cfg),
               "grad_norm": grad_norm.item()}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with rt.autocast():  # every rank scores the whole validation set (FSDP needs them all)
                row["val_ppl"] = perplexity(rt.unwrap(model), val, device=rt.device)
            row["val_loss"] = math.log(row["val_ppl"])
            state = {**checkpoint(rt.unwrap(model), size, rt.model_state(model)),
                     "optimizer": rt.optimizer_state(model, opt), "step": step, "order": order.get_state(),
                     "batches": batches, "pos": pos}
            if rt.main:
                atomic_save(state, last)
        if rt.main:
            metrics.log(**row)
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "val_loss", "lr")})
        bar.update()
    bar.close()
    return rt.unwrap(model), metrics


# ---- stage 3: reinforcement learning with the CAGSR reward (§4, §5) ----------------------------


@dataclass(frozen=True)
class RewardConfig:
    alpha: float = 1.0  # coverage weight (§7.2)
    beta: float = 0.5  # focus weight
    gamma: float = 1.0  # repetition-penalty weight
    entropy_floor: float = 0.0  # §6 guard: attention entropy below this earns no extra focus
    last_layers: int = 1  # L' of §3.2
    ngram: int = 2
    top_k: int = 3  # words of highest IDF per prompt in I_x (entities come on top)


# The paper's lr 1e-5 is for a 1.3B model; a 4.6M model needs larger steps to move in a few dozen
# iterations. The SFT policy is nearly deterministic, so the N samples of a prompt differ in reward by
# ~0.003 while prompts differ by ~0.2: only the group baseline exposes that signal (a value head would
# have to be 1 % accurate first). See README, "Choosing the tiny RL settings".
RL_PRESETS = {"tiny": PPOConfig(iterations=40, lr=1e-4, kl_coef=0.01, baseline="group"),
              "small": PPOConfig(lr=3e-5, baseline="group")}


def rl(args) -> Path:
    """PPO on the chosen reward, starting from (and KL-anchored to) the SFT checkpoint."""
    return train_policy(args, args.method, args.seed, args.run / (getattr(args, "name", None) or args.method))


def train_policy(args, method: str, seed: int, rdir: Path) -> Path:
    """One RL run of `method` into rdir: config.json, metrics.jsonl, rl_curves.png and rl.pt."""
    final = rdir / "rl.pt"
    if final.exists() and not args.force:
        print(f"rl: reusing {final}")
        return final
    rdir.mkdir(parents=True, exist_ok=True)
    check_resume(rdir / "rl-last.pt", args)
    tok = tokenizer_for(args.run)
    cfg, rcfg = overrides(RL_PRESETS.get(args.size, PPOConfig()), args), overrides(RewardConfig(), args)
    policy, reference = (load_model(args.run / "sft.pt", args.device) for _ in range(2))
    reference.eval().requires_grad_(False)
    prompts = [tok.encode(r["prompt"]) for d in DATASETS for r in load_split(d, "train", args.data)]
    if args.rt.main:
        atomic_write_text(rdir / "config.json", json.dumps({"method": method, "seed": seed, "ppo": asdict(cfg),
                                                            "reward": asdict(rcfg)}, indent=2))
        print(f"rl: {method}, seed {seed}, {cfg.iterations} iterations of {cfg.batch_prompts} prompts × {cfg.samples}")
    rt = args.rt
    model, metrics = train_rl(policy, reference, prompts, reward_for_method(method, args, tok, rcfg), cfg,
                              rcfg.last_layers, rdir, seed, rt, args.size)
    state = policy_state(rt.model_state(model))
    if rt.main:
        atomic_save(checkpoint(policy, args.size, state), final)
        plot_rl(metrics.read("rl"), rdir / "rl_curves.png")
        print(f"rl: wrote {final} and {rdir / 'rl_curves.png'}")
    rt.barrier()
    return final


def overrides(cfg, args):
    """cfg with every field that was given on the command line replaced."""
    given = {k: v for k, v in vars(args).items() if k in cfg.__dataclass_fields__ and v is not None}
    return replace(cfg, **given)


def check_resume(last: Path, args):
    if last.exists() and not (args.resume or args.force):
        raise CLIError(f"{last} holds an interrupted run: add --resume to continue it or --force to start over")
    if last.exists() and args.force:
        last.unlink()


def reward_for(run: Path, tok: Tokenizer, rcfg: RewardConfig) -> AttentionReward:
    """The CAGSR reward of §3.2 with the run's IDF table."""
    try:
        idf = load_idf(run / "idf.json")
    except (OSError, ValueError):
        raise CLIError(f"{run / 'idf.json'} is missing or corrupt: run `python cagsr.py prepare`")
    return AttentionReward(idf, tok.pieces, (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id), rcfg.alpha,
                           rcfg.beta, rcfg.gamma, rcfg.entropy_floor, rcfg.ngram, rcfg.top_k)


ABLATIONS = {"cagsr-no-coverage": {"alpha": 0.0}, "cagsr-no-focus": {"beta": 0.0}, "cagsr-no-repeat": {"gamma": 0.0}}
HYBRID_WEIGHT = 1.0  # R = R_CAGSR + 1.0 · R_human-pref (the learned reward is normalised on references)


def reward_for_method(method: str, args, tok: Tokenizer, rcfg: RewardConfig):
    """The reward each method of §7.3/§7.6 optimises (the hybrid is §6/§9's future work)."""
    if method == "cagsr" or method in ABLATIONS:
        return reward_for(args.run, tok, replace(rcfg, **ABLATIONS.get(method, {})))
    if method == "synthetic-pref":
        return learned_reward("synthetic", args, tok)
    if method == "human-pref":
        return learned_reward("human", args, tok)
    if method == "hybrid":
        return SumReward(reward_for(args.run, tok, rcfg), learned_reward("human", args, tok), HYBRID_WEIGHT)
    raise CLIError(f"unknown method {method!r}; choose one of {', '.join(evaluate.METHODS[1:])}")


def learned_reward(kind: str, args, tok: Tokenizer) -> LearnedReward:
    """A §7.3 reward model (trained on first use, by rank 0), normalised on 256 training references."""
    path = args.run / f"rm-{kind}.pt"
    if args.rt.main:
        train_reward_model(kind, args, tok)
    args.rt.barrier()
    sft_model = load_model(args.run / "sft.pt", args.device)
    rm = load_reward_model(path, lambda: Transformer(sft_model.cfg)).to(args.device).eval()
    refs = [(r["prompt"], r["response"]) for d in DATASETS for r in load_split(d, "train", args.data)[:128]]
    return LearnedReward(rm, tok, refs)


def train_reward_model(kind: str, args, tok: Tokenizer) -> Path:
    """§7.3 baselines' reward models from SFT samples, once per run directory.
    synthetic: good = references and SFT samples that pass automatic checks, bad = corruptions;
    human: 1,000 training prompts × 2 SFT samples (temperature 1.5), preferred by the simulated oracle,
    15 % flipped (§2.2), ties dropped."""
    path = args.run / f"rm-{kind}.pt"
    if path.exists():
        return path
    sft_model, rng = load_model(args.run / "sft.pt", args.device), random.Random(args.seed)
    rm, steps = PreferenceRewardModel(sft_model), getattr(args, "rm_steps", None) or 150
    if kind == "synthetic":
        examples = []
        for d in DATASETS:
            records = rng.sample(load_split(d, "train", args.data), 300)
            samples = answers(sft_model, tok, [r["prompt"] for r in records], greedy=False, device=args.device)
            examples += synthetic_labels(records, samples, rng)
        losses = train_classifier_rm(rm, tok, examples, steps=steps, lr=3e-4, seed=args.seed)
        size = f"{len(examples)} labelled responses"
    else:
        records = rng.sample([r for d in DATASETS for r in load_split(d, "train", args.data)], 1000)
        # at temperature 1 our near-deterministic SFT policy gives two equally good answers to 9 prompts
        # in 10 and the oracle has nothing to prefer; at 1.5 about 4 pairs in 10 differ
        a, b = (answers(sft_model, tok, [r["prompt"] for r in records], False, 1.5, device=args.device)
                for _ in range(2))
        pairs = human_preference_pairs(records, a, b, flip=0.15, rng=rng)
        losses = train_bradley_terry_rm(rm, tok, pairs, steps=steps, lr=3e-4, seed=args.seed)
        size = f"{len(pairs)} preference pairs (ties dropped)"
    save_reward_model(rm, path)
    print(f"reward model {kind}: {size}, loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}; {path}")
    return path


def train_rl(policy, reference, prompts, reward_fn, cfg: PPOConfig, last_layers: int, rdir: Path, seed=0,
             rt=None, size="tiny", quiet=False):
    """The RL loop: every iteration samples `batch_prompts` training prompts, collects a rollout and
    runs a PPO update; a resumable checkpoint (policy, value head, optimizer, RNG states, β_KL) every
    `checkpoint_every` iterations. A NaN or inf stops the run and leaves the last good checkpoint.
    In a distributed run (`rt`) each rank takes an equal share of the iteration's prompts and draws
    their sampling noise from the one global draw, rewards and advantage statistics are summed over
    the ranks, and only rank 0 writes. Returns the trained ActorCritic (policy + value head) and the
    metrics file."""
    rt = rt or runtime.setup()
    if cfg.batch_prompts % rt.world:
        raise CLIError(f"--batch-prompts {cfg.batch_prompts} does not split evenly over {rt.world} processes")
    torch.manual_seed(seed)
    rdir.mkdir(parents=True, exist_ok=True)
    value_head = ValueHead(policy.cfg.d_model)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    order = torch.Generator().manual_seed(seed)  # prompt draws and minibatch shuffles
    metrics, last, start = Metrics(rdir / "metrics.jsonl"), rdir / "rl-last.pt", 0
    ck = load_checkpoint(last) if last.exists() else None
    if ck:
        policy.load_state_dict(ck["model"]), value_head.load_state_dict(ck["value_head"])
    # FSDP: sampling runs the layers a token at a time outside the model's forward, so per-layer
    # shards would be all-gathered at every step; one group is gathered once per rollout instead
    # (the Adam states, the largest part, stay sharded; see memory_plan)
    model = rt.prepare(ActorCritic(policy, value_head), cfg.baseline != "value", shard_layers=False)
    reference.to(rt.device)
    policy, value_head = rt.unwrap(model).policy, rt.unwrap(model).value_head
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if ck:
        rt.load_optimizer_state(model, opt, ck["optimizer"])
        order.set_state(ck["order"]), torch.set_rng_state(ck["rng"])
        kl_ctl.coef, start = ck["kl_coef"], ck["step"]
        if rt.main:
            print(f"rl: resuming from iteration {start} ({last})")
    if rt.main:
        metrics.truncate("rl", start)
    history = metrics.read("rl")

    def mean(x):  # over every rank's rows (each rank holds the same number)
        return x.float().mean().item() if rt.world == 1 else (rt.all_sum(x.float().mean()) / rt.world).item()

    bar = tqdm(total=cfg.iterations, initial=start, desc="rl", disable=quiet or not rt.main, dynamic_ncols=True)
    for it in range(start, cfg.iterations):
        idx = torch.randperm(len(prompts), generator=order)[: cfg.batch_prompts]
        noise = None
        if rt.distributed:  # this rank's prompts, and their rows of the global batch's sampling noise
            noise = torch.rand(len(idx), cfg.samples, cfg.max_new_tokens, generator=order)[rt.rank :: rt.world]
            idx, noise = idx[rt.rank :: rt.world], noise.reshape(-1, cfg.max_new_tokens).to(rt.device)
        src = pad([prompts[i] for i in idx], policy.cfg.pad_id).to(rt.device)
        with rt.gathered(model), rt.autocast():
            batch, terms, kl, times = collect_rollout(policy, value_head, reference, src, reward_fn, cfg,
                                                      kl_ctl.coef, last_layers, rt.all_sum, noise)
        if not torch.isfinite(rt.all_sum(batch.reward.sum())):
            raise CLIError(f"rl: the reward became NaN/inf at iteration {it + 1}; last good checkpoint: {last}")
        t0 = time.perf_counter()
        try:
            stats = ppo_update(model, opt, batch, cfg, order, rt)
        except FloatingPointError as e:
            raise CLIError(f"rl: {e} at iteration {it + 1}; last good checkpoint: {last}")
        kl_seq = mean(kl.sum(1))  # KL(π ‖ π_ref) per response, k1 estimate
        row = {"stage": "rl", "step": it + 1, "reward": mean(batch.reward),
               **{k: mean(v) for k, v in terms.items()}, "kl": kl_seq, "kl_coef": kl_ctl.coef,
               "length": mean(batch.mask.sum(1)),
               "explained_var": explained_variance(batch.v_old, batch.returns[:, 0]), **stats,
               **times, "t_update": time.perf_counter() - t0}
        kl_ctl.update(kl_seq, len(batch.reward) * rt.world)
        history.append(row)
        if rt.main:
            metrics.log(**row)
            warn_reward_hacking(history, bar)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            state = rt.model_state(model)
            head = {k.removeprefix("value_head."): v for k, v in state.items() if k.startswith("value_head.")}
            ck = {**checkpoint(policy, size, policy_state(state)), "optimizer": rt.optimizer_state(model, opt),
                  "value_head": head,
                  "order": order.get_state(), "rng": torch.get_rng_state(), "kl_coef": kl_ctl.coef, "step": it + 1}
            if rt.main:
                atomic_save(ck, last)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("reward", "coverage", "focus", "repeat", "kl", "length")
                         if k in row})
        bar.update()
    bar.close()
    return model, metrics


def policy_state(actor_critic_state: dict) -> dict:
    """The policy's weights out of an ActorCritic state dict."""
    return {k.removeprefix("policy."): v for k, v in actor_critic_state.items() if k.startswith("policy.")}


def warn_reward_hacking(history: list[dict], bar):
    """§6: say so when responses collapse in length or attention sits below the entropy floor for most
    steps — once when it starts, not at every iteration."""
    first = history[0]
    collapsed = [r["length"] < 0.5 * first["length"] for r in history[-2:]]
    spiky = [r.get("below_floor", 0) > 0.5 for r in history[-2:]]
    now = history[-1]
    if collapsed[-1] and (len(history) == 1 or not collapsed[0]):
        bar.write(f"warning: mean response length fell from {first['length']:.1f} to {now['length']:.1f} "
                  f"tokens at iteration {now['step']} — the policy may be gaming the reward (§6)")
    if spiky[-1] and (len(history) == 1 or not spiky[0]):
        bar.write(f"warning: attention entropy is below the floor on {now['below_floor']:.0%} of steps at "
                  f"iteration {now['step']} — spiky-attention reward hacking (§6)")


# ---- stage 4: the paper's comparison — Table 1 and the ablations (§7.3–7.6) ------------------


def table1(args):
    """Every method with the same RL budget and seeds, scored by judges no policy trained against;
    finished runs are reused. Writes results.json, results.md and results.png under <run>/table1/."""
    t0, out = time.time(), args.run / "table1"
    methods = args.methods.split(",") if args.methods else list(evaluate.METHODS)
    if unknown := [m for m in methods if m not in evaluate.METHODS]:
        raise CLIError(f"unknown method {unknown[0]!r}; choose from {', '.join(evaluate.METHODS)}")
    if not args.report_only:
        args.resume = True
        prepare(args)
        sft(args)
        judge = relevance_judge(args)
        for seed in range(args.seeds):
            for method in methods:
                score_method(args, method, seed, judge)
    per_seed = {}
    for method in methods:
        for seed in range(args.seeds):
            path = out / f"{method}-seed{seed}" / "scores.json"
            if path.exists():
                for d, scores in json.loads(path.read_text()).items():
                    per_seed.setdefault(d, {}).setdefault(method, []).append(scores)
    if not per_seed:
        raise CLIError(f"no finished Table-1 runs under {out}: run `python cagsr.py table1` first")
    results = evaluate.aggregate(per_seed)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", evaluate.table1_markdown(results))
    evaluate.plot_table1(results, out / "results.png")
    print(evaluate.table1_markdown(results))
    print(f"table1: {len(methods)} methods × {args.seeds} seeds in {time.time() - t0:.0f} s -> {out}/results.md")


def relevance_judge(args) -> "evaluate.RelevanceJudge":
    path = args.run / "judge.pt"
    if path.exists():
        return evaluate.RelevanceJudge.load(path)
    judge, accuracy = evaluate.RelevanceJudge.train(path, args.data, seed=args.seed)
    print(f"relevance judge: validation accuracy {accuracy:.2%} -> {path}")
    return judge


def score_method(args, method: str, seed: int, judge):
    """Train (unless no-rl) and score one method and seed on the first --eval-prompts test prompts of
    each data set; the scores go to <run>/table1/<method>-seed<seed>/scores.json."""
    rdir = args.run / "table1" / f"{method}-seed{seed}"
    if (rdir / "scores.json").exists():
        return
    rdir.mkdir(parents=True, exist_ok=True)
    no_rl_scores = args.run / "table1" / "no-rl-seed0" / "scores.json"
    if method == "no-rl" and seed > 0 and no_rl_scores.exists():  # greedy answers of one SFT model
        return atomic_write_text(rdir / "scores.json", no_rl_scores.read_text())
    tok, rcfg = tokenizer_for(args.run), overrides(RewardConfig(), args)
    path = args.run / "sft.pt" if method == "no-rl" else train_policy(args, method, seed, rdir)
    model = load_model(path, args.device)
    scores = {}
    for d in DATASETS:
        records = load_split(d, "test", args.data)[: args.eval_prompts]
        texts, terms = answer_and_reward(model, tok, records, reward_for(args.run, tok, rcfg), rcfg.last_layers,
                                         args.device)
        scores[d] = evaluate.score_responses(records, texts, judge, terms["reward"], terms["attn_entropy"], args.data)
        scores[d]["self_reward"] = sum(terms["reward"]) / len(records)
        scores[d]["perplexity"] = perplexity(model, encode_pairs(tok, records, model.cfg.max_len), device=args.device)
    atomic_write_text(rdir / "scores.json", json.dumps(scores, indent=2))
    print(f"table1: {method} seed {seed}: " + ", ".join(f"{d} relevance {s['relevance']:.3f} oracle "
                                                        f"{s['oracle']:.2f}" for d, s in scores.items()))


# ---- memory plan for a GPU run (runtime.memory_plan) -------------------------------------------


def plan_cmd(args):
    gpus = args.gpus if args.distributed else 1
    p = memory_plan(args.size, args.dtype, args.batch_prompts or 64, args.samples or 4, 4, args.grad_checkpoint,
                    gpus, args.distributed)
    where = f"each of {gpus} processes ({args.distributed})" if args.distributed else "one RL process"
    print(f"{args.size}: {p['parameters'] / 1e6:,.1f}M parameters; {where}, {args.dtype}, "
          f"{args.batch_prompts or 64} prompts × {args.samples or 4} samples, 4 minibatches"
          f"{', gradient checkpointing' if args.grad_checkpoint else ''} (estimates, GiB)")
    for k in ("weights", "gradients", "adam", "reference", "activations", "total"):
        print(f"  {k:12} {p[k]:8.2f}")
    print("  fits on: " + (", ".join(g for g, mem in GPUS.items() if p["total"] < 0.9 * mem) or "none of "
                           + ", ".join(GPUS) + " — shard with FSDP or checkpoint activations"))


# ---- plots -----------------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed), imported on first plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str):
    """One line per metric key against the step; metrics logged only sometimes are drawn with markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 50 else None, label=k)
    ax.set_xlabel("step"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rl(rows: list[dict], path: Path):
    """The RL run at a glance: reward and its terms, KL to the reference, response length."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    panels = [(["reward", "coverage", "focus", "repeat", "rm"], "reward terms"), (["kl"], "KL(π ‖ π_SFT) per response"),
              (["length"], "response length (tokens)")]
    steps = [r["step"] for r in rows]
    for ax, (keys, title) in zip(axes, panels):
        for k in [k for k in keys if k in rows[0]]:  # a learned reward has "rm", not the attention terms
            ax.plot(steps, [r[k] for r in rows], label=k)
        ax.set_xlabel("iteration"), ax.set_title(title), ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(attn, prompt_pieces: list[str], response_pieces: list[str], path: Path, title: str):
    """Heat map of Ā [T, S]: one row per response token, one column per prompt token."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(0.45 * len(prompt_pieces) + 2, 0.35 * len(response_pieces) + 1.5))
    ax.imshow(attn, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(len(prompt_pieces)), prompt_pieces, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(response_pieces)), response_pieces, fontsize=8)
    ax.set_xlabel("prompt token j"), ax.set_ylabel("response step t"), ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- evaluation and sampling -----------------------------------------------------------------


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
    """On the test splits, from greedy answers: QA exact-fact accuracy; per data set the mean CAGSR
    reward terms and response length, and the perplexity of the references."""
    result = {}
    for d in DATASETS:
        records = load_split(d, "test", data)
        texts, terms = answer_and_reward(model, tok, records, reward_fn, last_layers, device)
        result.update({f"{d}_{k}": sum(v) / len(v) for k, v in terms.items() if k != "below_floor"})
        result[f"{d}_test_ppl"] = perplexity(model, encode_pairs(tok, records, model.cfg.max_len), device=device)
        if d == "qa":
            result["qa_fact_accuracy"] = evaluate.fact_accuracy(texts, records)
    return result


def eval_cmd(args) -> dict:
    tok, model = tokenizer_for(args.run), load_model(args.checkpoint or args.run / "sft.pt", args.device)
    rcfg = overrides(RewardConfig(), args)
    result = evaluate_policy(model, tok, reward_for(args.run, tok, rcfg), rcfg.last_layers, args.data, args.device)
    atomic_write_text(args.run / "eval.json", json.dumps(result, indent=2))
    print(" | ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def sample_cmd(args):
    """Answer one prompt, print it, and draw its cross-attention heat map."""
    tok, model = tokenizer_for(args.run), load_model(args.checkpoint or args.run / "sft.pt", args.device)
    ids = tok.encode(args.prompt)
    if len(ids) > model.cfg.max_len:
        raise CLIError(f"prompt has {len(ids)} tokens; the {args.size} model reads at most {model.cfg.max_len}")
    model.eval()
    last = args.last_layers or RewardConfig.last_layers
    r = model.generate(torch.tensor([ids], device=args.device), greedy=args.temperature == 0,
                       temperature=args.temperature or 1.0, capture_last=last)
    n = int(r.mask[0].sum())
    print(tok.decode(r.tokens[0].tolist()))
    path = args.run / "attention.png"
    plot_attention(r.cross_attn[0, :n].cpu(), [tok.pieces[i] for i in ids],
                   [tok.pieces[i] for i in r.tokens[0, :n].tolist()], path,
                   f"cross-attention, last {last} layer(s), heads averaged")
    print(f"heat map: {path}")


def pipeline(args):
    """The default job: every stage in order, each reused when its output already exists."""
    t0 = time.time()
    args.resume = True  # a rerun of the pipeline continues whatever was interrupted
    prepare(args)
    sft(args)
    tok, sft_model = tokenizer_for(args.run), load_model(args.run / "sft.pt", args.device)
    qa = load_split("qa", "test", args.data)[:5]
    for r, answer in zip(qa, answers(sft_model, tok, [r["prompt"] for r in qa], device=args.device)):
        print(f"\n  prompt:    {r['prompt']}\n  model:     {answer}\n  reference: {r['response']}")
    rl(args)
    rows = Metrics(args.run / args.method / "metrics.jsonl").read("rl")
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (rows[:5], rows[-5:]))
    print(f"\nRL training batches: reward {first:.4f} (first 5 iterations) -> {last:.4f} (last 5); "
          f"KL to SFT {rows[-1]['kl']:.2f} nats per response")
    rcfg = overrides(RewardConfig(), args)
    reward_fn, results = reward_for(args.run, tok, rcfg), {}
    for name, path in (("sft (No-RL)", args.run / "sft.pt"), (f"rl ({args.method})", args.run / args.method / "rl.pt")):
        model = load_model(path, args.device)
        results[name] = evaluate_policy(model, tok, reward_fn, rcfg.last_layers, args.data, args.device)
    atomic_write_text(args.run / "eval.json", json.dumps(results, indent=2))
    names = list(results)
    print(f"\nTest split, greedy answers{'':14}" + "".join(f"{n:>16}" for n in names))
    for k in results[names[0]]:
        print(f"  {k:38}" + "".join(f"{results[n][k]:16.4f}" for n in names))
    print(f"done in {time.time() - t0:.0f} s; outputs in {args.run}/")


# ---- command line ----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--size", choices=list(PRESETS), default="tiny", help="model preset (default tiny)")
    common.add_argument("--out", type=Path, help="run directory (default runs/<size>)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--data", type=Path, default=DATA_DIR, help="data set directory (default data/)")
    common.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    common.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast the forward passes, keep fp32 master weights (default fp32)")
    common.add_argument("--compile", action="store_true", help="torch.compile the training forward passes")
    common.add_argument("--grad-checkpoint", action="store_true",
                        help="recompute activations in the backward pass (less memory, ≈⅓ more compute)")
    common.add_argument("--distributed", choices=["ddp", "fsdp"],
                        help="sft/rl under torchrun: DistributedDataParallel or fully sharded (FSDP)")
    common.add_argument("--force", action="store_true", help="redo a stage even if its output exists")
    common.add_argument("--resume", action="store_true", help="continue an interrupted stage from its checkpoint")
    common.add_argument("--method", choices=evaluate.METHODS[1:], default="cagsr", help="RL reward (default cagsr)")
    for name, kind, text in (("--alpha", float, "coverage weight α (1.0)"), ("--beta", float, "focus weight β (0.5)"),
                             ("--gamma", float, "repetition weight γ (1.0)"),
                             ("--entropy-floor", float, "§6 floor on attention entropy (0 = off)"),
                             ("--last-layers", int, "L': decoder layers averaged into Ā (1)")):
        common.add_argument(name, type=kind, help=text)
    rl_flags = Parser(add_help=False)
    for name, kind, text in (("--iterations", int, "RL iterations"), ("--batch-prompts", int, "prompts per iteration"),
                             ("--samples", int, "N responses per prompt"), ("--lr", float, "Adam learning rate"),
                             ("--clip-eps", float, "PPO clipping ε"), ("--kl-coef", float, "β_KL to the SFT model"),
                             ("--kl-target", float, "adapt β_KL towards this KL (0 = fixed)"),
                             ("--ent-coef", float, "entropy bonus"), ("--epochs", int, "PPO epochs per iteration"),
                             ("--minibatches", int, "PPO minibatches per epoch"),
                             ("--baseline", str, "value (V_old(x), §4) or group (mean of the other samples)"),
                             ("--checkpoint-every", int, "iterations between resumable checkpoints"),
                             ("--rm-steps", int, "training steps of a learned reward model (default 150)")):
        rl_flags.add_argument(name, type=kind, help=text)
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               parents=[common, rl_flags])
    sub = p.add_subparsers(dest="command")
    sub.add_parser("prepare", parents=[common], help="check the data, train the tokenizer, print length stats")
    s = sub.add_parser("sft", parents=[common], help="supervised fine-tuning: the No-RL baseline")
    s.add_argument("--steps", type=int), s.add_argument("--batch-size", type=int), s.add_argument("--lr", type=float)
    e = sub.add_parser("eval", parents=[common], help="exact-fact accuracy and perplexity on the test split")
    e.add_argument("--checkpoint", type=Path, help="model to score (default <run>/sft.pt)")
    s = sub.add_parser("sample", parents=[common], help="answer one prompt and draw its attention heat map")
    s.add_argument("--prompt", required=True)
    s.add_argument("--checkpoint", type=Path, help="model to use (default <run>/sft.pt)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r = sub.add_parser("rl", parents=[common, rl_flags], help="PPO from the SFT checkpoint on the chosen reward")
    r.add_argument("--name", help="output folder under the run directory (default: the method)")
    t = sub.add_parser("table1", parents=[common, rl_flags], help="Table 1 and ablations: every method, several seeds")
    t.add_argument("--seeds", type=int, default=3, help="RL seeds per method (default 3)")
    t.add_argument("--methods", help=f"comma-separated subset of {','.join(evaluate.METHODS)}")
    t.add_argument("--eval-prompts", type=int, default=300, help="test prompts scored per data set (300, as §7.4)")
    t.add_argument("--report-only", action="store_true", help="only assemble the finished runs' scores")
    pl = sub.add_parser("plan", parents=[common, rl_flags], help="memory needed to train a preset, and which GPUs fit")
    pl.add_argument("--gpus", type=int, default=8, help="processes of a --distributed plan (default 8)")
    return p


COMMANDS = {None: pipeline, "prepare": prepare, "sft": sft, "rl": rl, "eval": eval_cmd, "sample": sample_cmd,
            "table1": table1}


def main(argv=None):
    args = parser().parse_args(argv)
    args.run = args.out or Path("runs") / args.size
    try:
        if args.command == "plan":  # a plan needs no device and starts no process group
            return plan_cmd(args)
        if args.distributed and args.command not in ("sft", "rl"):
            raise CLIError("--distributed works with the sft and rl subcommands (run prepare first, in one process)")
        args.rt = runtime.setup(args.device, args.dtype, args.compile, args.grad_checkpoint, args.distributed)
        args.device = args.rt.device
        COMMANDS[args.command](args)
    except (CLIError, DataError, ValueError, runtime.LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
