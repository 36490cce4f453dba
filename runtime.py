"""Where and how training runs: device, precision, compilation, activation checkpointing, and several
processes under `torchrun` with PyTorch's own DistributedDataParallel or FSDP.

The training loops in cagsr.py stay the same on a laptop and on eight GPUs; they ask a `Runtime` to
wrap the model, to open the autocast region of the forward passes, and to sum a statistic over ranks.

    python cagsr.py sft --size 1.3b --device cuda --dtype bf16 --grad-checkpoint --compile
    torchrun --nproc_per_node=8 cagsr.py rl --size 1.3b --device cuda --dtype bf16 --distributed fsdp

In a distributed run every rank holds an equal share of each global batch (the batch is the same as
in one process: --batch-size / --batch-prompts are global), gradients are averaged by DDP/FSDP with
each rank's loss weighted by its share of the tokens, so an SFT step equals the single-process step
of the same global batch (tests/test_runtime.py: to 1e-5). In RL each rank also shuffles its own
prompts into the PPO minibatches, so with more than one minibatch the minibatches are composed
differently from one process's — the same expected update, not the same numbers; with one minibatch
an iteration agrees with `torchrun --nproc_per_node=1` (a distributed run draws the sampling noise of
the whole global batch at once, a plain run step by step, so a plain run samples other responses).
Rank 0 alone writes checkpoints, metrics and plots.
"""
import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from model import PRESETS, Transformer


class LaunchError(Exception):
    """A device or launch setting that cannot work here (reported as one line by the CLI)."""


@dataclass
class Runtime:
    device: torch.device
    dtype: str = "fp32"  # "bf16": matmuls under autocast in bfloat16, master weights and optimizer in fp32
    compile: bool = False  # torch.compile the teacher-forced passes; on a GPU also the sampling step (CUDA graphs)
    grad_checkpoint: bool = False  # recompute each layer's activations in the backward pass
    distributed: str | None = None  # "ddp" or "fsdp" under torchrun
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The one process that writes files and prints."""
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")

    def prepare(self, model, find_unused=False, shard_layers=True) -> nn.Module:
        """The model to train, on the device: activation checkpointing and compilation switched on
        where asked, then wrapped in DDP (every rank keeps the whole model, gradients are all-reduced)
        or FSDP (parameters, gradients and optimizer states sharded; with `shard_layers` each layer is
        gathered just for its forward and backward, otherwise the model is one group gathered whole).
        `find_unused`: some parameters get no gradient in a step (DDP must then look for them).
        Build the optimizer on the returned module's parameters."""
        model = model.to(self.device)
        for m in model.modules():
            if hasattr(m, "grad_checkpoint"):
                m.grad_checkpoint = self.grad_checkpoint
            if self.compile and hasattr(m, "compile_teacher_forcing"):
                m.compile_teacher_forcing()
                if self.device.type == "cuda":
                    m.compile_sampling()
        if self.distributed == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
        if self.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard
            for m in list(model.modules()) if shard_layers else []:
                if type(m).__name__ in ("EncoderLayer", "DecoderLayer"):
                    fully_shard(m)
            fully_shard(model)
        return model

    @staticmethod
    def unwrap(model) -> nn.Module:
        """The module itself (DDP keeps it in .module; FSDP changes the module in place)."""
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    @contextlib.contextmanager
    def gathered(self, model):
        """Full parameters on every rank for code that does not go through forward (sampling):
        a no-op except under FSDP, where every sharded group is all-gathered and resharded after."""
        groups = []
        if self.distributed == "fsdp":
            from torch.distributed.fsdp import FSDPModule
            groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in groups:
            m.unshard()
        try:
            yield
        finally:
            for m in groups:
                m.reshard()

    def model_state(self, model) -> dict:
        """The full state dict on CPU (under FSDP every rank must call this; rank 0 gets the tensors)."""
        if self.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.unwrap(model).state_dict()

    def optimizer_state(self, model, opt) -> dict:
        if self.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(model, opt, options=full)
        return opt.state_dict()

    def load_optimizer_state(self, model, opt, state: dict):
        if self.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ of x over the ranks (x itself in one process)."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def reduce_stats(self, values: dict, weight: float) -> dict:
        """Statistics of the whole job from each rank's: Σ_rank weight·value for means (weight = the
        rank's share of what was averaged), min/max over the ranks for *_min/*_max."""
        if self.world == 1:
            return values
        out, ops = {}, {"_min": dist.ReduceOp.MIN, "_max": dist.ReduceOp.MAX}
        for k, v in values.items():
            op = ops.get(k[-4:], dist.ReduceOp.SUM)
            t = torch.tensor(v * weight if op == dist.ReduceOp.SUM else v, dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=op)
            out[k] = t.item()
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def machine(device=None) -> dict:
    """The processor, cores, torch, threads and load that a timing or a result was made with."""
    info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu = f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    m = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
         "threads": torch.get_num_threads(), "python": sys.version.split()[0],
         "load_1min": os.getloadavg()[0]}  # other work on the machine skews every number below
    if device is not None and device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    return m


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N or auto (the first GPU if torch sees one, else the CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LaunchError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LaunchError(f"--device {name}: torch sees no CUDA GPU (CPU build of torch, or no driver); "
                            f"see README, 'Full runs on a rented GPU'")
    if device.type not in ("cpu", "cuda"):
        raise LaunchError(f"--device {name}: only cpu and cuda are supported")
    return device


def setup(device="cpu", dtype="fp32", compile=False, grad_checkpoint=False, distributed=None) -> Runtime:
    """The Runtime of this process; with `distributed`, joins the torchrun job (NCCL on GPUs, gloo on
    CPUs) and takes GPU number LOCAL_RANK."""
    dev = resolve_device(device)
    if dtype == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LaunchError("--dtype bf16: this GPU has no bfloat16 support; use --dtype fp32")
    if not distributed:
        return Runtime(dev, dtype, compile, grad_checkpoint)
    if "RANK" not in os.environ:
        raise LaunchError(f"--distributed {distributed} needs several processes: launch with "
                            f"torchrun --nproc_per_node=K cagsr.py ...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return Runtime(dev, dtype, compile, grad_checkpoint, distributed, dist.get_rank(), dist.get_world_size())


# ---- how much memory a run needs ---------------------------------------------------------------

GPUS = {"RTX 4090 / L4 (24 GB)": 24, "A100 40GB": 40, "A100 / H100 80GB": 80, "H200 (141 GB)": 141}


def memory_plan(size, dtype="bf16", batch_prompts=64, samples=4, minibatches=4, grad_checkpoint=False,
                gpus=1, distributed=None) -> dict:
    """Estimated GiB per process of RL training: fp32 master weights, gradients and Adam moments of
    policy and value head; the frozen reference in `dtype`; the activations of this process's part of
    one PPO minibatch of padded (prompt + response) sequences. Over `gpus` processes the prompts are
    split; FSDP also shards the Adam moments (weights and gradients are whole while a step runs: RL
    gathers the model as one group, see cagsr.train_rl). Per token and attention block we count
    34·D + 5·H·L bytes in mixed precision (Korthikanti et al. 2022; twice that in fp32), or one stored
    D-vector with gradient checkpointing; the fp32 logits and their gradient add 8·V bytes per token.
    `size`: a preset's name or a ModelConfig (e.g. a checkpoint's, hf.read_config)."""
    cfg = PRESETS[size] if isinstance(size, str) else size
    with torch.device("meta"):
        params = Transformer(cfg).num_parameters()
    trained = params + cfg.d_model * cfg.d_model + 2 * cfg.d_model + 1  # policy + value head
    half = 2 if dtype == "bf16" else 4
    tokens = batch_prompts * samples // minibatches // gpus * 2 * cfg.max_len
    blocks = cfg.n_enc_layers + 2 * cfg.n_dec_layers  # a decoder layer has two attention blocks
    per_token = (cfg.d_model * half if grad_checkpoint
                 else (34 * cfg.d_model + 5 * cfg.n_heads * cfg.max_len) * half // 2)
    gib = 2**30
    plan = {"parameters": params, "weights": 4 * trained / gib, "gradients": 4 * trained / gib,
            "adam": 8 * trained / gib / (gpus if distributed == "fsdp" else 1), "reference": half * params / gib,
            "activations": (tokens * blocks * per_token + tokens * cfg.vocab_size * 8) / gib}
    plan["total"] = sum(v for k, v in plan.items() if k != "parameters")
    return plan
