"""CAGSR from the command line: prepare → supervised fine-tuning → reinforcement → evaluation.

    python cagsr.py --size tiny          # the whole pipeline; a rerun reuses finished stages
    python cagsr.py sft --size tiny      # one stage; `python cagsr.py SUBCOMMAND --help` for its flags

Every output goes to runs/<size>/ (or --out DIR): config.json, metrics.jsonl, checkpoints, PNG plots.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
from data import DATA_DIR, DATASETS, SPLITS, DataError, format_stats, length_stats, load_split
from data.tokenizer import Tokenizer, train_tokenizer, training_texts
from model import PRESETS, Transformer

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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)


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


def sequence_nll(model, src, dec_in, tgt) -> torch.Tensor:
    """Summed negative log-likelihood of each target sequence: [B]."""
    logits, _ = model(src, dec_in)
    nll = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=model.cfg.pad_id, reduction="none")
    return nll.sum(dim=1)


@torch.no_grad()
def perplexity(model, pairs, batch_size=128, device="cpu") -> float:
    """exp(mean NLL per target token, EOS included) over `pairs`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        src, dec_in, tgt = (t.to(device) for t in batch(pairs[i : i + batch_size], model.cfg))
        total += sequence_nll(model, src, dec_in, tgt).sum().item()
        count += (tgt != model.cfg.pad_id).sum().item()
    return math.exp(total / count)


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str], batch_size=128, device="cpu") -> list[str]:
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        src = pad([tok.encode(p) for p in prompts[i : i + batch_size]], tok.pad_id).to(device)
        out += [tok.decode(row.tolist()) for row in model.generate(src, greedy=True, capture_last=0).tokens]
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
    tok = tokenizer_for(run)
    mcfg = replace(PRESETS[args.size], pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    cfg = replace(SFT_PRESETS[args.size], **{k: v for k, v in vars(args).items()
                                              if k in SFTConfig.__dataclass_fields__ and v is not None})
    train = encode_pairs(tok, [r for d in DATASETS for r in load_split(d, "train", args.data)], mcfg.max_len)
    val = encode_pairs(tok, [r for d in DATASETS for r in load_split(d, "validation", args.data)], mcfg.max_len)
    val = val[:: max(1, len(val) // cfg.eval_pairs)][: cfg.eval_pairs]
    (run / "config.json").write_text(json.dumps({"size": args.size, "model": asdict(mcfg), "sft": asdict(cfg)},
                                                indent=2))
    model, metrics = train_sft(mcfg, cfg, train, val, run, args.seed, args.device, size=args.size)
    atomic_save(checkpoint(model, args.size), final)
    plot_curves(metrics.read("sft"), ["loss", "val_loss"], run / "sft_loss.png", "supervised fine-tuning")
    print(f"sft: wrote {final} and {run / 'sft_loss.png'}")
    return final


def checkpoint(model: Transformer, size: str, **extra) -> dict:
    overrides = {k: v for k, v in asdict(model.cfg).items() if getattr(PRESETS[size], k) != v}
    return {"size": size, "model_overrides": overrides, "model": model.state_dict(), **extra}


def epoch_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled batches in which pairs of similar length travel together, so little of
    each batch is padding: shuffle, sort within windows of 16 batches, then shuffle the batches."""
    perm, window = torch.randperm(len(lengths), generator=gen), 16 * batch_size
    chunks = [perm[i : i + window] for i in range(0, len(perm), window)]
    ordered = torch.cat([c[lengths[c].argsort(stable=True)] for c in chunks])
    batches = list(ordered[: len(ordered) // batch_size * batch_size].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen)]


def train_sft(mcfg, cfg: SFTConfig, train, val, run: Path, seed=0, device="cpu", size="tiny", quiet=False):
    """The training loop. Every `eval_every` steps: validation loss/perplexity, and a resumable
    checkpoint (sft-last.pt: model, optimizer, step, data order RNG) so an interrupted run continues."""
    torch.manual_seed(seed)
    model = Transformer(mcfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    order = torch.Generator().manual_seed(seed)
    metrics, last, step = Metrics(run / "metrics.jsonl"), run / "sft-last.pt", 0
    lengths = torch.tensor([len(x) + len(y) for x, y in train])
    batches, pos = epoch_batches(lengths, cfg.batch_size, order), 0
    if last.exists():
        ck = load_checkpoint(last)
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"]), order.set_state(ck["order"])
        step, batches, pos = ck["step"], ck["batches"], ck["pos"]
        print(f"sft: resuming from step {step} ({last})")
    metrics.truncate("sft", step)
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", disable=quiet, dynamic_ncols=True)
    while step < cfg.steps:
        if pos == len(batches):  # a fresh shuffle each epoch
            batches, pos = epoch_batches(lengths, cfg.batch_size, order), 0
        src, dec_in, tgt = (t.to(device) for t in batch([train[i] for i in batches[pos]], mcfg))
        pos += 1
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = sequence_nll(model, src, dec_in, tgt).sum() / (tgt != mcfg.pad_id).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(loss):
            raise CLIError(f"sft: loss became {loss.item()} at step {step}; last good checkpoint: {last}")
        opt.step()
        step += 1
        row = {"stage": "sft", "step": step, "loss": loss.item(), "lr": lr_at(step - 1, cfg),
               "grad_norm": grad_norm.item()}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row["val_ppl"] = perplexity(model, val, device=device)
            row["val_loss"] = math.log(row["val_ppl"])
            atomic_save({**checkpoint(model, size), "optimizer": opt.state_dict(), "step": step,
                         "order": order.get_state(), "batches": batches, "pos": pos}, last)
        metrics.log(**row)
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "val_loss", "lr")})
        bar.update()
    bar.close()
    return model, metrics


# ---- plots -----------------------------------------------------------------------------------


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str):
    """One line per metric key against the step; metrics logged only sometimes are drawn with markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 50 else None, label=k)
    ax.set_xlabel("step"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(attn, prompt_pieces: list[str], response_pieces: list[str], path: Path, title: str):
    """Heat map of Ā [T, S]: one row per response token, one column per prompt token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.45 * len(prompt_pieces) + 2, 0.35 * len(response_pieces) + 1.5))
    ax.imshow(attn, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(len(prompt_pieces)), prompt_pieces, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(response_pieces)), response_pieces, fontsize=8)
    ax.set_xlabel("prompt token j"), ax.set_ylabel("response step t"), ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- evaluation and sampling -----------------------------------------------------------------


def evaluate_policy(model, tok, data=DATA_DIR, device="cpu") -> dict:
    """Greedy exact-fact accuracy on the QA test split and test perplexity on both data sets."""
    qa = load_split("qa", "test", data)
    answers = greedy_answers(model, tok, [r["prompt"] for r in qa], device=device)
    result = {"qa_fact_accuracy": evaluate.fact_accuracy(answers, qa)}
    for d in DATASETS:
        result[f"{d}_test_ppl"] = perplexity(model, encode_pairs(tok, load_split(d, "test", data), model.cfg.max_len),
                                             device=device)
    return result


def eval_cmd(args) -> dict:
    tok, model = tokenizer_for(args.run), load_model(args.checkpoint or args.run / "sft.pt", args.device)
    result = evaluate_policy(model, tok, args.data, args.device)
    (args.run / "eval.json").write_text(json.dumps(result, indent=2))
    print(" | ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def sample_cmd(args):
    """Answer one prompt, print it, and draw its cross-attention heat map."""
    tok, model = tokenizer_for(args.run), load_model(args.checkpoint or args.run / "sft.pt", args.device)
    ids = tok.encode(args.prompt)
    if len(ids) > model.cfg.max_len:
        raise CLIError(f"prompt has {len(ids)} tokens; the {args.size} model reads at most {model.cfg.max_len}")
    model.eval()
    r = model.generate(torch.tensor([ids], device=args.device), greedy=args.temperature == 0,
                       temperature=args.temperature or 1.0, capture_last=args.last_layers)
    n = int(r.mask[0].sum())
    print(tok.decode(r.tokens[0].tolist()))
    path = args.run / "attention.png"
    plot_attention(r.cross_attn[0, :n].cpu(), [tok.pieces[i] for i in ids],
                   [tok.pieces[i] for i in r.tokens[0, :n].tolist()], path,
                   f"cross-attention, last {args.last_layers} layer(s), heads averaged")
    print(f"heat map: {path}")


def pipeline(args):
    """The default job: every stage in order, each reused when its output already exists."""
    t0 = time.time()
    prepare(args)
    sft(args)
    tok, model = tokenizer_for(args.run), load_model(args.run / "sft.pt", args.device)
    qa = load_split("qa", "test", args.data)[:5]
    for r, answer in zip(qa, greedy_answers(model, tok, [r["prompt"] for r in qa], device=args.device)):
        print(f"\n  prompt:    {r['prompt']}\n  model:     {answer}\n  reference: {r['response']}")
    result = evaluate_policy(model, tok, args.data, args.device)
    (args.run / "eval.json").write_text(json.dumps(result, indent=2))
    print("\nNo-RL (SFT) on the test split: " + " | ".join(f"{k} {v:.3f}" for k, v in result.items()))
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
    common.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    common.add_argument("--force", action="store_true", help="redo a stage even if its output exists")
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[common])
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
    s.add_argument("--last-layers", type=int, default=1, help="L': decoder layers averaged into Ā")
    return p


COMMANDS = {None: pipeline, "prepare": prepare, "sft": sft, "eval": eval_cmd, "sample": sample_cmd}


def main(argv=None):
    args = parser().parse_args(argv)
    args.run = args.out or Path("runs") / args.size
    try:
        COMMANDS[args.command](args)
    except (CLIError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
