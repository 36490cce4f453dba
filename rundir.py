"""The run directory on disk: every file a stage writes or reads back goes through this module.

    atomic_write, atomic_save    a crash leaves the old file or the new one, never half of one
    load_checkpoint, load_model  torch.load with weights_only=True: no pickled code is ever executed
    model_checkpoint             what load_model reads back
    export_hf                    the model as a Hugging Face T5 checkpoint folder
    record_init, run_init        which pretrained checkpoint (--init) a run directory starts from
    Metrics                      metrics.jsonl, one JSON object per logged step
    check_resume, CLIError       an interrupted stage continues only when asked; bad input is one line

A run directory (runs/<size>/ by default) holds tokenizer.model, idf.json, config.json, metrics.jsonl,
sft.pt, and one folder per RL run (config.json, metrics.jsonl, rl.pt, rl_curves.png).
"""
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

import hf
from model import ModelConfig, Transformer


class CLIError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2."""


def _replace_atomically(path: Path, write) -> None:
    """write(tmp) into a temporary file beside `path`, flush it to disk, then rename it over `path`. The
    temporary name carries the process id, so that torchrun's ranks writing the same file do not collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically."""
    _replace_atomically(path, lambda tmp: tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data))


def atomic_save(obj, path: Path) -> None:
    """torch.save `obj` (tensors and plain containers) to `path` atomically."""
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by atomic_save, loaded without executing pickled code."""
    if not path.exists():
        raise CLIError(f"checkpoint {path} not found: run the stage that writes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or foreign objects
        raise CLIError(f"checkpoint {path} is corrupt ({type(e).__name__}); delete it and rerun the stage")


def model_checkpoint(model: Transformer, state=None, **extra) -> dict:
    """What load_model reads back: the model's config, the weights (`state`, default
    model.state_dict()), and any `extra` entries of a resumable checkpoint."""
    return {"model_config": asdict(model.cfg), "model": model.state_dict() if state is None else state, **extra}


def load_model(path: Path, device="cpu") -> Transformer:
    """The Transformer of a checkpoint written with model_checkpoint, or of a Hugging Face T5 folder."""
    if Path(path).is_dir():
        return Transformer.from_pretrained(path).to(device)
    ckpt = load_checkpoint(path)
    try:
        model = Transformer(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CLIError(f"checkpoint {path} does not hold a model of this project ({type(e).__name__})")
    return model.to(device)


def export_hf(model: Transformer, folder, tokenizer_file=None) -> Path:
    """Write `model` as a Hugging Face T5 checkpoint that T5ForConditionalGeneration.from_pretrained
    reads: config.json, model.safetensors (weights renamed by hf.hf_name) and, when given, the
    sentencepiece model as spiece.model — each file atomically."""
    from safetensors.torch import save
    folder = Path(folder)
    tensors = {hf.hf_name(k): v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / "config.json", json.dumps(hf.hf_config(model.cfg), indent=2) + "\n")
    if tokenizer_file is not None:
        atomic_write(folder / "spiece.model", Path(tokenizer_file).read_bytes())
    return folder


def record_init(run: Path, init: Path | None) -> None:
    """Tie the run directory to the checkpoint folder it starts from (--init): the folder's spiece.model
    becomes the run's tokenizer.model and init.json names both. A run directory prepared from another
    starting point is an error, never silently mixed."""
    marker = run / "init.json"
    before = json.loads(marker.read_text())["init"] if marker.exists() else None
    now = str(Path(init).resolve()) if init else None
    if (run / "tokenizer.model").exists() and before != now:
        raise CLIError(f"{run} was prepared from {before or 'its own tokenizer'}, not {now or 'its own tokenizer'}: "
                       "use another --out")
    if init is None or marker.exists():
        return
    tokenizer = hf.tokenizer_file(init)
    atomic_write(run / "tokenizer.model", tokenizer.read_bytes())
    atomic_write(marker, json.dumps({"init": now, "tokenizer": str(tokenizer.resolve())}, indent=2))


def record_data(run: Path, data: Path) -> None:
    """Tie the run directory to the data it was prepared from (data.json): its tokenizer, IDF table and
    models were fitted to that data, so a later stage with another --data is an error, never mixed."""
    marker, now = run / "data.json", str(Path(data).resolve())
    if marker.exists() and (before := json.loads(marker.read_text())["data"]) != now:
        raise CLIError(f"{run} was prepared from --data {before}, not {now}: use another --out")
    if not marker.exists():
        atomic_write(marker, json.dumps({"data": now}, indent=2))


def run_init(run: Path) -> Path | None:
    """The checkpoint folder the run directory was prepared from, or None (record_init)."""
    marker = run / "init.json"
    return Path(json.loads(marker.read_text())["init"]) if marker.exists() else None


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
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def check_resume(last: Path, resume: bool, force: bool) -> None:
    """An interrupted stage's checkpoint `last` is continued only with --resume, dropped with --force."""
    if last.exists() and not (resume or force):
        raise CLIError(f"{last} holds an interrupted run: add --resume to continue it or --force to start over")
    if last.exists() and force:
        last.unlink()
