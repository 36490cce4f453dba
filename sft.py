"""Supervised fine-tuning: the paper's No-RL baseline (§7.3) and the policy RL starts from.

Top to bottom: the configuration, the data (prompt/response pairs → padded tensors), the loss, the
learning-rate schedule and the batch order, the training loop, and the stage that writes sft.pt.
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import runtime
import hf
from data.user import records
from data.tokenizer import tokenizer_for
from model import PRESETS, ModelConfig, Transformer, decoder_input
from plots import plot_curves
from rundir import CLIError, Metrics, atomic_save, atomic_write, check_resume, load_checkpoint, model_checkpoint, \
    run_init


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 1500  # AdamW steps
    batch_size: int = 64  # pairs per step (over all processes)
    lr: float = 1e-3  # peak learning rate
    warmup: int = 100  # steps of linear warmup
    min_lr_ratio: float = 0.1  # cosine decay ends at lr · min_lr_ratio
    weight_decay: float = 0.01  # AdamW decay of the matrices (not of norms and biases)
    grad_clip: float = 1.0  # clip the gradient norm to this
    eval_every: int = 250  # steps between validation scores and resumable checkpoints
    eval_pairs: int = 512  # validation pairs scored at each evaluation


SFT_PRESETS = {
    "tiny": SFTConfig(),
    "small": SFTConfig(steps=6000, lr=5e-4),
    "base": SFTConfig(steps=10000, lr=3e-4),
    "large": SFTConfig(steps=10000, lr=1e-4),
    "1.3b": SFTConfig(steps=10000, lr=5e-5),
}


# ---- data → tensors -------------------------------------------------------------------------


def encode_prompts(tok, records: list[dict], max_len: int, field="prompt") -> list[list[int]]:
    """Ids + EOS of each record's `field`; one longer than the model takes is an error naming the record."""
    out = [tok.encode(r[field]) for r in records]
    for r, ids in zip(records, out):
        if len(ids) > max_len:
            raise CLIError(f"{r['id']}: {field} has {len(ids)} tokens; the model takes at most {max_len}")
    return out


def check_lengths(tok, splits: dict, max_len: int) -> None:
    """Every prompt and response fits the model's `max_len` tokens; else a one-line error naming the record."""
    for s in splits.values():
        encode_prompts(tok, s, max_len)
        encode_prompts(tok, [r for r in s if "response" in r], max_len, "response")


def encode_pairs(tok, records: list[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per record, each ending in EOS; too long or no response is an error."""
    for r in records:
        if "response" not in r:
            raise CLIError(f"{r['id']}: no \"response\"; supervised fine-tuning needs one (rl --init runs need only prompts)")
    return list(zip(encode_prompts(tok, records, max_len), encode_prompts(tok, records, max_len, "response")))


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad to the longest sequence: [B, max len]."""
    out = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def collate(pairs, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher forcing: src [B,S], targets y + EOS [B,T] (pad where none), decoder input: the targets
    shifted right behind the start token (model.decoder_input)."""
    src = pad([p for p, _ in pairs], cfg.pad_id)
    tgt = pad([y for _, y in pairs], cfg.pad_id)
    dec_in = decoder_input(tgt, cfg.pad_id)
    return src, dec_in, tgt


def sequence_nll(model, src, dec_in, tgt, pad_id: int) -> torch.Tensor:
    """Summed negative log-likelihood of each target sequence: −Σ_t log p(y_t | y_<t, x), [B]."""
    logits, _ = model(src, dec_in)
    nll = F.cross_entropy(logits.float().transpose(1, 2), tgt, ignore_index=pad_id, reduction="none")
    return nll.sum(dim=1)


# ---- schedule and batch order ------------------------------------------------------------------


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warmup, then cosine decay from lr to lr · min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled batches in which pairs of similar length travel together, so little of
    each batch is padding: shuffle, sort within windows of 16 batches, then shuffle the batches."""
    perm, window = torch.randperm(len(lengths), generator=gen), 16 * batch_size
    chunks = [perm[i : i + window] for i in range(0, len(perm), window)]
    ordered = torch.cat([c[lengths[c].argsort(stable=True)] for c in chunks])
    batches = list(ordered[: len(ordered) // batch_size * batch_size].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen)]


# ---- the loop ------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model, pairs, batch_size=128, device="cpu") -> float:
    """exp(mean NLL per target token, EOS included) over `pairs` (§7.4's perplexity)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        src, dec_in, tgt = (t.to(device) for t in collate(pairs[i : i + batch_size], model.cfg))
        total += sequence_nll(model, src, dec_in, tgt, model.cfg.pad_id).sum().item()
        count += (tgt != model.cfg.pad_id).sum().item()
    return math.exp(total / count)


def train_sft(mcfg, cfg: SFTConfig, train, val, run: Path, seed=0, rt=None, quiet=False, init=None):
    """The training loop, from a fresh model of config `mcfg` or from the pretrained checkpoint folder
    `init` (then mcfg is the checkpoint's, see hf.py). Every `eval_every` steps: validation loss/perplexity, and a resumable
    checkpoint (sft-last.pt: model, optimizer, step, data order RNG) so an interrupted run continues.
    `rt` (runtime.Runtime) places the model; in a distributed run each rank takes an equal slice of
    every global batch of `cfg.batch_size` pairs. Returns the trained model and the metrics file."""
    rt = rt or runtime.setup()
    if cfg.batch_size % rt.world:
        raise CLIError(f"--batch-size {cfg.batch_size} does not split evenly over {rt.world} processes")
    torch.manual_seed(seed)
    run.mkdir(parents=True, exist_ok=True)
    model = Transformer.from_pretrained(init) if init else Transformer(mcfg)
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
        src, dec_in, tgt = (t.to(rt.device) for t in collate([train[i] for i in mine], mcfg))
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
            state = {**model_checkpoint(rt.unwrap(model), rt.model_state(model)),
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


# ---- the stage: <run>/sft.pt ---------------------------------------------------------------------


def run_sft(run: Path, size: str, cfg: SFTConfig, data: Path, rt, seed=0, force=False, resume=False) -> Path:
    """Cross-entropy fine-tuning with AdamW on the training split behind `data` (both synthetic data
    sets, or the user's JSONL), of the `size` preset or of the checkpoint the run was prepared from
    (rundir.record_init); writes <run>/sft.pt (and sft_loss.png), or reuses it unless `force`."""
    final = run / "sft.pt"
    if final.exists() and not force:
        print(f"sft: reusing {final}")
        return final
    check_resume(run / "sft-last.pt", resume, force)
    tok = tokenizer_for(run)
    init = run_init(run)
    mcfg = ModelConfig(**hf.read_config(init)) if init else PRESETS[size]
    train = encode_pairs(tok, records("train", data), mcfg.max_len)
    val = encode_pairs(tok, records("validation", data), mcfg.max_len)
    val = val[:: max(1, len(val) // cfg.eval_pairs)][: cfg.eval_pairs]
    if rt.main:
        config = {"size": size, "init": init and str(init), "data": str(data), "model": asdict(mcfg), "sft": asdict(cfg)}
        atomic_write(run / "config.json", json.dumps(config, indent=2))
    model, metrics = train_sft(mcfg, cfg, train, val, run, seed, rt, init=init)
    state = rt.model_state(model)
    if rt.main:
        atomic_save(model_checkpoint(model, state), final)
        plot_curves(metrics.read("sft"), ["loss", "val_loss"], run / "sft_loss.png", "supervised fine-tuning")
        print(f"sft: wrote {final} and {run / 'sft_loss.png'}")
    rt.barrier()
    return final
