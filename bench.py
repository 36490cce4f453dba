"""Benchmarks of CAGSR on the machine at hand: speed and memory, ours against Hugging Face T5, and the
model-FLOP utilisation (MFU) of sampling, and the training throughput and MFU of SFT and of one RL
iteration.

    python bench.py [--size tiny] [--only sampling,sft,reward,rl,attention,train] [--repeats 5]
    python bench.py --only train --size small                           # tokens/s and MFU on the CPU
    python bench.py --only train --size 1.3b --device cuda --dtype bf16  # … and on a GPU

prints a Markdown table and writes runs/bench/bench.json. Each timing is one warm-up call, then the
median of `--repeats` calls; a ratio of two timings (ours/HF, bf16/fp32) is the median over rounds
that time the two in turn. The baseline is `T5ForConditionalGeneration` holding our randomly
initialised model's own weights (exported, so the same architecture and FLOPs; no weights are
downloaded); it needs the extra of requirements-bench.txt. The comparisons with it (sampling, sft,
reward, rl) run on the CPU in float32 (sampling also in bf16); `attention` times PyTorch's fused
attention kernel against model.attend's explicit softmax (no baseline); --device, --dtype, --compile
and --grad-checkpoint apply to `train` alone, which needs neither the baseline nor a tokenizer or data
files (random ids of the preset's shapes), so that it runs for every preset. Never run by the tests, except a smoke test of small sizes.
"""
import argparse
import copy
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from model import PRESETS, ModelConfig, Transformer, attend, decoder_input
from reward import cagsr_reward
from hf import read_config
from rundir import export_hf
from runtime import machine

HERE = Path(__file__).resolve().parent
TARGETS = {"sampling": 2.0,  # ours/HF ≥
           "sampling_mfu": 0.75,  # MFU of fp32 sampling ≥ (an aim, not a ratio)
           "sft": 1.2,  # ours/HF ≥
           "reward_share": 0.05}  # reward/generate <


def sync(device=None):
    """Wait for the GPU's queued work: CUDA calls return before the work is done, so a clock read
    without this times the launch, not the computation. A no-op on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device=None) -> float:
    """One warm-up call (allocator, kernel selection), then the median of `repeats` timed calls
    (each between two `sync`s on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratio(ours, theirs, repeats: int) -> tuple[float, float, float]:
    """Seconds of `ours` and of `theirs` and their ratio, timed in turns: one warm-up call of each,
    then `repeats` rounds that time ours, then theirs. Returns the median seconds of each and the
    median over rounds of theirs/ours. Taking turns puts a drift of a shared machine's speed into both
    sides of a round alike; timing all of one side's repeats before the other's does not."""
    ours(), theirs()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        middle = time.perf_counter()
        theirs()
        rounds.append((middle - start, time.perf_counter() - middle))
    a, b = zip(*rounds)
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in rounds)


def random_ids(B: int, S: int, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """[B,S] ids ≥ 3 (no pad, eos or unk): every prompt is full length."""
    return torch.randint(3, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


# ─── the two models ───────────────────────────────────────────────────────────────────────────────

def ours_without_eos(cfg: ModelConfig, init=None) -> Transformer:
    """Our model (random, or the checkpoint folder `init`) with EOS added to the tokens it may never
    emit (the `banned` buffer), so every sample runs the full number of steps — the counterpart of HF's
    `min_new_tokens`."""
    torch.manual_seed(0)
    model = (Transformer.from_pretrained(init) if init else Transformer(cfg)).eval()
    model.banned[cfg.eos_id] = True
    return model


def hf_t5(cfg: ModelConfig):
    """Hugging Face's T5ForConditionalGeneration holding the same weights as ours_without_eos(cfg):
    our model exported (rundir.export_hf) and loaded back — same architecture, same FLOPs."""
    from transformers import T5ForConditionalGeneration
    with tempfile.TemporaryDirectory() as folder:
        export_hf(ours_without_eos(cfg), folder)
        # eager: the only attention implementation that returns the weights
        return T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def hf_sample(hf, src_ids, num_samples: int, new_tokens: int) -> torch.Tensor:
    """HF sampling plus what our rollout hands out for free: Ā of the last layer, heads averaged."""
    from transformers import DynamicCache, EncoderDecoderCache
    # An empty cache that grows per layer: the one generate builds from the config has num_layers
    # (encoder) entries and fails when the decoder is deeper.
    out = hf.generate(src_ids, cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), do_sample=True,
                      top_k=0, num_return_sequences=num_samples, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, output_attentions=True, return_dict_in_generate=True)
    last = torch.stack([step[-1] for step in out.cross_attentions])  # [T,B·N,H,1,S]
    return last.mean(dim=2)[:, :, 0].transpose(0, 1)  # [B·N,T,S]


# ─── 1. sampling with cross-attention capture ────────────────────────────────────────────────────

def sampling_case(cfg: ModelConfig, prompts: int, samples: int, new_tokens: int, prompt_len: int):
    """The workload of bench_sampling, shared with the memory subprocess."""
    return random_ids(prompts, prompt_len, cfg, seed=1), dict(num_samples=samples, max_new_tokens=new_tokens)


def peak_rss_mib(size: str, which: str, prompts: int, samples: int, new_tokens: int, prompt_len: int) -> float:
    """Peak resident memory added by one cold sampling call, in MiB. Run in a fresh process (see
    `sampling_memory`): /proc/self/clear_refs resets the kernel's high-water mark VmHWM, so the figure
    is VmHWM after the call minus VmRSS before it — the model and the imports are not counted."""
    cfg = PRESETS[size]
    src, kw = sampling_case(cfg, prompts, samples, new_tokens, prompt_len)
    model = hf_t5(cfg) if which == "hf" else ours_without_eos(cfg)

    def status(key):  # kB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    with torch.no_grad():
        if which == "hf":
            hf_sample(model, src, kw["num_samples"], kw["max_new_tokens"])
        else:
            model.generate(src, capture_last=1, **kw)
    return (status("VmHWM:") - before) / 1024


def sampling_memory(size: str, which: str, *case) -> float:
    code = f"import bench; print(bench.peak_rss_mib({size!r}, {which!r}, *{case!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def bench_sampling(cfg: ModelConfig, prompts=64, samples=4, new_tokens=32, prompt_len=24, repeats=3,
                   baseline=True, size=None) -> dict:
    """New tokens/s of `generate` with Ā of the last layer captured, float32 (and ours in bf16
    autocast); with `size`, also the peak memory of each in a fresh process. MFU of the fp32 sampling:
    its model FLOPs (forward_flops of the prompts and the B·N responses — a KV-cached decode does a
    teacher-forced pass's work) over the highest of two fp32 matmul_peak measurements, one before
    the timings and one after."""
    src, kw = sampling_case(cfg, prompts, samples, new_tokens, prompt_len)  # src [B,S]
    ours = ours_without_eos(cfg)
    steps, peaks = [], [matmul_peak("cpu", "fp32")["flops"]]

    def run_ours():
        rollout = ours.generate(src, capture_last=1, **kw)
        steps.append(rollout.tokens.shape[1])  # steps actually run: = new_tokens, EOS being banned

    def run_ours_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run_ours()

    tokens = prompts * samples * new_tokens
    result = {"new_tokens": tokens}
    with torch.no_grad():
        if baseline:
            hf = hf_t5(cfg)
            ours_s, hf_s, result["ratio"] = paired_ratio(run_ours, lambda: hf_sample(hf, src, samples, new_tokens),
                                                         repeats)
            result["ours_tok_s"], result["hf_tok_s"] = tokens / ours_s, tokens / hf_s
        else:
            result["ours_tok_s"] = tokens / median_seconds(run_ours, repeats)
        bf16_s, fp32_s, result["bf16_ratio"] = paired_ratio(run_ours_bf16, run_ours, repeats)
        result["ours_bf16_tok_s"], result["ours_fp32_tok_s_paired"] = tokens / bf16_s, tokens / fp32_s
    assert set(steps) == {new_tokens}, f"a rollout stopped early: {set(steps)} steps"
    peaks.append(matmul_peak("cpu", "fp32")["flops"])
    result["flops"] = forward_flops(cfg, prompts, prompt_len, prompts * samples, new_tokens)
    result["peak_flops"] = max(peaks)
    for which in ("ours", "hf"):
        if f"{which}_tok_s" in result:  # FLOPs per second = FLOPs / (tokens / tok_s)
            result[f"{which}_mfu"] = result["flops"] * result[f"{which}_tok_s"] / tokens / result["peak_flops"]
    if size is not None:
        case = (prompts, samples, new_tokens, prompt_len)
        for which in ("ours", "hf") if baseline else ("ours",):
            result[f"{which}_peak_mib"] = sampling_memory(size, which, *case)
    return result


# ─── 2. one supervised fine-tuning step ───────────────────────────────────────────────────────────

def bench_sft_step(cfg: ModelConfig, pairs=256, prompt_len=24, response_len=32, repeats=3, baseline=True) -> dict:
    """Tokens/s (prompt + response) of forward, cross-entropy, backward and an AdamW step."""
    src = random_ids(pairs, prompt_len, cfg, seed=2)  # [B,S]
    response = random_ids(pairs, response_len, cfg, seed=3)  # [B,T]
    decoder_in = decoder_input(response, cfg.pad_id)  # [B,T]: start token + y<t
    tokens = pairs * (prompt_len + response_len)

    def ours_loss(model):
        logits, _ = model(src, decoder_in)  # [B,T,V]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), response.flatten())

    def hf_loss(model):  # T5 shifts `labels` right behind decoder_start_token_id = pad: the same input
        return model(input_ids=src, labels=response).loss

    def training_step(model, loss_fn):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            opt.step()
        return step

    torch.manual_seed(0)
    ours = training_step(Transformer(cfg), ours_loss)
    if not baseline:
        return {"tokens": tokens, "ours_tok_s": tokens / median_seconds(ours, repeats)}
    ours_s, hf_s, ratio = paired_ratio(ours, training_step(hf_t5(cfg), hf_loss), repeats)
    return {"tokens": tokens, "ours_tok_s": tokens / ours_s, "hf_tok_s": tokens / hf_s, "ratio": ratio}


# ─── 3. the reward's share of a rollout ───────────────────────────────────────────────────────────

def bench_reward_share(cfg: ModelConfig, prompts=64, samples=4, new_tokens=32, prompt_len=64, repeats=3) -> dict:
    """Time of cagsr_reward on a rollout's worth of Ā, as a share of the time generate takes for it."""
    src = random_ids(prompts, prompt_len, cfg, seed=4)  # [B,S]
    model = ours_without_eos(cfg)
    BN, g = prompts * samples, torch.Generator().manual_seed(5)
    attn = torch.randn(BN, new_tokens, prompt_len, generator=g).softmax(dim=-1)  # [B·N,T,S]
    important = torch.rand(BN, prompt_len, generator=g) < 0.2  # [B·N,S]
    response_ids = torch.randint(4, cfg.vocab_size, (BN, new_tokens), generator=g)  # [B·N,T]
    lengths = torch.randint(1, new_tokens + 1, (BN, 1), generator=g)
    response_mask = torch.arange(new_tokens) < lengths  # [B·N,T]: random lengths 1…T

    with torch.no_grad():
        generate_s = median_seconds(lambda: model.generate(src, samples, new_tokens, capture_last=1), repeats)
    reward_s = median_seconds(lambda: cagsr_reward(attn, important, response_ids, response_mask), repeats)
    return {"generate_s": generate_s, "reward_s": reward_s, "share": reward_s / generate_s}


# ─── 4. one RL iteration, part by part ────────────────────────────────────────────────────────────

class EndsEarly(Transformer):
    """A random model whose EOS logit is raised by `eos_logit`: with the tiny preset's ~N(0, 1) logits
    over 1,536 tokens, +5 ends a response with probability ≈ 1/17 per step — lengths like those of the
    hard regime's SFT policy (mean ≈ 17 tokens, a few of every batch reaching the limit), so the
    rollout has the padding a real one has."""

    def __init__(self, cfg: ModelConfig, eos_logit: float):
        super().__init__(cfg)
        self.register_buffer("eos_bias", eos_logit * (torch.arange(cfg.vocab_size) == cfg.eos_id), persistent=False)

    def logits(self, h):
        return super().logits(h) + self.eos_bias


def bench_rl_iteration(cfg: ModelConfig, prompts=64, prompt_len=24, eos_logit=5.0, repeats=3, size="tiny") -> dict:
    """Seconds of one CAGSR iteration (ppo.collect_rollout + ppo.ppo_update) with the `size` preset's
    PPO settings (rl.RL_PRESETS, else PPOConfig(); tiny: 4 samples of at most 48 tokens, group
    baseline) on `prompts` prompts, split into sampling, reward, reference log-probs and the PPO
    update; median per part. The policy is EndsEarly; "length" is the mean response length, "padded"
    the longest."""
    from ppo import ActorCritic, PPOConfig, ValueHead, adam, collect_rollout, ppo_update
    from reward import AttentionReward
    from rl import RL_PRESETS

    pieces = ["<pad>", "</s>", "<unk>"] + [f"\u2581w{chr(97 + i % 26)}{i // 26}" for i in range(cfg.vocab_size - 3)]
    reward_fn = AttentionReward({}, pieces)
    torch.manual_seed(0)
    policy = EndsEarly(cfg, eos_logit)
    reference = copy.deepcopy(policy).requires_grad_(False)
    head = ValueHead(cfg.d_model)
    ppo_cfg = replace(RL_PRESETS.get(size, PPOConfig()), batch_prompts=prompts)
    opt = adam([*policy.parameters(), *head.parameters()], ppo_cfg)
    src, gen = random_ids(prompts, prompt_len, cfg, seed=6), torch.Generator().manual_seed(0)
    parts = []
    for _ in range(repeats + 1):  # the first is the warm-up
        batch, _, _, times = collect_rollout(policy, head, reference, src, reward_fn, ppo_cfg, ppo_cfg.kl_coef, 1)
        start = time.perf_counter()
        ppo_update(ActorCritic(policy, head), opt, batch, ppo_cfg, gen)
        parts.append({**times, "t_update": time.perf_counter() - start,
                      "length": batch.mask.sum(1).float().mean().item(), "padded": batch.tokens.shape[1]})
    result = {k: statistics.median(p[k] for p in parts[1:]) for k in parts[0]}
    result["total_s"] = sum(result[k] for k in ("t_sample", "t_reward", "t_reference", "t_update"))
    result["prompts"], result["samples"] = prompts, ppo_cfg.samples
    return result


# ─── 5. the device's matmul peak ──────────────────────────────────────────────────────────────────

def matmul_peak(device="cpu", dtype="fp32", target_s=0.1, repeats=5) -> dict:
    """Measured peak FLOP/s of one large square matmul C = A·B (A, B n×n of `dtype`, 2·n³ FLOPs) on
    `device` with the current torch threads: the yardstick of MFU here, in place of a datasheet figure
    (which a CPU has none of, and which a GPU reaches only on ideal shapes). n is `matmul_size`; each
    timing runs enough back-to-back products to last ≈ `target_s` and ends with a `sync`; one warm-up
    timing, then the median of `repeats`. Returns {"flops": FLOP/s, "n": n}. Measured afresh at each
    call: on a shared machine the figure moves with the others' load (bench_train takes the highest
    of several)."""
    device, n = torch.device(device), matmul_size(str(device), dtype, target_s, torch.get_num_threads())
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dt) for _ in range(2))
    k = max(1, math.ceil(target_s / matmul_seconds(a, b, 1)))
    matmul_seconds(a, b, k)
    return {"flops": 2 * n**3 / statistics.median(matmul_seconds(a, b, k) for _ in range(repeats)), "n": n}


def matmul_seconds(a, b, k: int) -> float:
    """Seconds of one a·b, from k back-to-back products between two `sync`s."""
    sync(a.device)
    start = time.perf_counter()
    for _ in range(k):
        torch.mm(a, b)
    sync(a.device)
    return (time.perf_counter() - start) / k


@functools.lru_cache(maxsize=None)
def matmul_size(device: str, dtype: str, target_s: float, threads: int) -> int:
    """n of matmul_peak: doubled from 256 (4096 on a GPU) until one product takes `target_s` (n ≈ 2048
    on one or two CPU cores) or n reaches 8192 (16384 on a GPU). Found once per (device, dtype, threads)."""
    device = torch.device(device)
    n, n_max = (4096, 16384) if device.type == "cuda" else (256, 8192)
    g = torch.Generator(device=device).manual_seed(0)
    while n < n_max:
        a, b = (torch.randn(n, n, generator=g, device=device,
                            dtype=torch.bfloat16 if dtype == "bf16" else torch.float32) for _ in range(2))
        matmul_seconds(a, b, 1)  # warm-up: kernel selection, allocator
        if matmul_seconds(a, b, 1) >= target_s:
            break
        n *= 2
    return n


# ─── 6. model FLOPs of the encoder–decoder ─────────────────────────────────────────────────────────

def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(N_src, N_tgt): the matrix-product weights a source (prompt) token and a target (response)
    token pass through — every nn.Linear weight and the output matrix, no norms, position biases or
    embedding lookups (a lookup is no product). With I = H·d_kv the width of the heads and f = 3
    feed-forward matrices when gated, 2 when not:

        N_src = L_enc·(4D·I + f·D·F) + L_dec·2D·I   encoder layers; each decoder layer's cross-
                                                    attention K/V projection, run on the prompt's states
        N_tgt = L_dec·(6D·I + f·D·F) + V·D          self-attention Q,K,V,O; cross-attention Q,O; feed-
                                                    forward; the output projection
    """
    D, F, I, f = cfg.d_model, cfg.d_ff, cfg.inner_dim, 3 if cfg.gated else 2
    return (cfg.n_enc_layers * (4 * D * I + f * D * F) + cfg.n_dec_layers * 2 * D * I,
            cfg.n_dec_layers * (6 * D * I + f * D * F) + cfg.vocab_size * D)


def forward_flops(cfg: ModelConfig, prompts: int, prompt_len: int, rows: int, response_len: int,
                  attention=True) -> int:
    """Model FLOPs of one forward pass over `prompts` prompts of S = prompt_len tokens and `rows`
    responses of T = response_len tokens (rows = prompts·N: the encoder and the cross-attention K/V
    run once per prompt, as in our model), counting a multiply-add as 2 FLOPs:

        F_fwd = 2·N_src·B·S + 2·N_tgt·B·N·T + 4·I·(L_enc·B·S² + L_dec·B·N·(T(T+1)/2 + T·S))

    The last term is attention: q·kᵀ and weights·v cost 2·I FLOPs each per (query, key) pair summed
    over the heads, for the pairs the masks allow — S per encoder query, t+1 per causal decoder query
    (T(T+1)/2 in all; PaLM counts the full T², a ≤ 2× overcount of this term only), S per cross-
    attention query. Sampling with a KV cache does exactly this work too: step t attends to t+1 cached
    keys, so a rollout's forward FLOPs are those of a teacher-forced pass over the same tokens. Not
    counted: softmax, norms, activations, biases, the value head (all O(D) per token, < 1 % here)."""
    I, S, T = cfg.inner_dim, prompt_len, response_len
    n_src, n_tgt = matmul_params(cfg)
    flops = 2 * n_src * prompts * S + 2 * n_tgt * rows * T
    if attention:
        flops += 4 * I * (cfg.n_enc_layers * prompts * S * S + cfg.n_dec_layers * rows * (T * (T + 1) // 2 + T * S))
    return flops


def train_flops(cfg: ModelConfig, prompts: int, prompt_len: int, rows: int, response_len: int) -> int:
    """Model FLOPs of forward + backward: 3·F_fwd (the backward pass computes the gradients of both a
    product's inputs and its weights, twice the forward's work) — i.e. the standard 6·N per token,
    here 6·N_src per prompt token + 6·N_tgt per response token, plus 12·D per attended (query, key)
    pair and layer. PaLM's convention (Chowdhery et al. 2022, appendix B): MFU counts the FLOPs the
    model needs, not those the implementation spends — activation recomputation (--grad-checkpoint)
    adds work but no model FLOPs, so it lowers MFU."""
    return 3 * forward_flops(cfg, prompts, prompt_len, rows, response_len)


# ─── 7. training throughput and model-FLOP utilisation ────────────────────────────────────────────

def bench_train(size: str, device="cpu", dtype="fp32", repeats=3, cfg: ModelConfig | None = None,
                batch_size: int | None = None, prompts: int | None = None, compile=False,
                grad_checkpoint=False, init=None) -> dict:
    """Tokens/s and MFU of training, as cagsr.py trains, on random ids of the preset's shapes (of a
    loaded checkpoint's with `init`, a Hugging Face T5 folder: its weights, its config, the `size`
    preset's SFT and PPO settings):

    - SFT: one step of train_sft — forward under autocast, summed token NLL over the target tokens,
      backward, gradient clipping, AdamW — on the preset's SFT batch (or `batch_size`) of full-length
      pairs, prompt and response each max_len/2 tokens. Tokens/s counts prompt + response tokens.
    - RL: one iteration of train_rl — collect_rollout (sampling N responses per prompt with Ā of the
      last layer, the CAGSR reward, the reference's log-probs, V_old) and ppo_update (epochs ×
      minibatches with ActorCritic), with the preset's PPOConfig (rl.RL_PRESETS, else
      PPOConfig()) and `prompts` prompts per iteration if given; prompts are max_len/2 tokens and EOS is
      banned so every response has max_new_tokens tokens. Tokens/s counts the generated tokens (B·N·T)
      per second of the whole iteration; its model FLOPs are sampling (F_fwd of the rollout), the
      reference's forward (F_fwd) and epochs × 3·F_fwd of the update (V_old reads the encoder states
      of the sampling pass).

    MFU = model FLOPs / seconds / peak, where peak is the highest of three matmul_peak(device, dtype)
    measurements — before SFT, between SFT and RL, after RL — so that a peak caught while other work
    slowed the machine cannot inflate MFU (all three are in "peak_runs"). Timings: one warm-up step
    (iteration), then the median of `repeats`; on a GPU also the peak memory allocated (GiB)."""
    from rl import RL_PRESETS
    from sft import SFT_PRESETS, sequence_nll
    from ppo import ActorCritic, PPOConfig, ValueHead, adam, collect_rollout, ppo_update
    from reward import AttentionReward
    from runtime import setup

    rt = setup(str(device), dtype, compile, grad_checkpoint)
    dev, cfg = rt.device, cfg or PRESETS[size]
    peaks = [matmul_peak(dev, dtype)]
    gpu = dev.type == "cuda"
    result = {"device": str(dev), "dtype": dtype, "compile": compile, "grad_checkpoint": grad_checkpoint}

    def peak_gib():
        return torch.cuda.max_memory_allocated(dev) / 2**30 if gpu else None

    # SFT: B pairs, S + T tokens each
    sft_cfg = SFT_PRESETS.get(size, SFT_PRESETS["tiny"])
    B, S, T = batch_size or sft_cfg.batch_size, cfg.max_len // 2, cfg.max_len // 2
    src, tgt = random_ids(B, S, cfg, seed=7).to(dev), random_ids(B, T, cfg, seed=8).to(dev)
    dec_in = decoder_input(tgt, cfg.pad_id)
    torch.manual_seed(0)
    with torch.device(dev):  # initialised in place: a 1.3B model would take a while on the CPU
        model = rt.prepare(Transformer.from_pretrained(init).to(dev) if init else Transformer(cfg))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": sft_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=sft_cfg.lr, betas=(0.9, 0.98))

    def sft_step():
        model.train()
        with rt.autocast():
            loss = sequence_nll(model, src, dec_in, tgt, cfg.pad_id).sum() / tgt.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), sft_cfg.grad_clip)
        opt.step()

    if gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = median_seconds(sft_step, repeats, dev)
    flops = train_flops(cfg, B, S, B, T)
    result["sft"] = {"pairs": B, "prompt_len": S, "response_len": T, "tokens": B * (S + T), "seconds": seconds,
                     "tok_s": B * (S + T) / seconds, "flops": flops, "flops_per_token": flops / (B * (S + T)),
                     "peak_gib": peak_gib()}
    del model, opt, decay, no_decay
    if gpu:
        torch.cuda.empty_cache()
    peaks.append(matmul_peak(dev, dtype))

    # RL: B prompts of S tokens, N samples of T new tokens each
    ppo_cfg = RL_PRESETS.get(size, PPOConfig())
    if prompts:
        ppo_cfg = replace(ppo_cfg, batch_prompts=prompts)
    B, N, S = ppo_cfg.batch_prompts, ppo_cfg.samples, cfg.max_len // 2
    vocab = cfg.vocab_size
    pieces = ["<pad>", "</s>", "<unk>"] + [f"\u2581w{chr(97 + i % 26)}{i // 26}" for i in range(vocab - 3)]
    reward_fn = AttentionReward({}, pieces)
    with torch.device(dev):
        policy = ours_without_eos(cfg, init).to(dev)
        head = ValueHead(cfg.d_model)
    reference = copy.deepcopy(policy).requires_grad_(False)
    model = rt.prepare(ActorCritic(policy, head), ppo_cfg.baseline != "value", shard_layers=False)
    policy, head = rt.unwrap(model).policy, rt.unwrap(model).value_head
    opt = adam(model.parameters(), ppo_cfg)
    src, gen = random_ids(B, S, cfg, seed=9).to(dev), torch.Generator().manual_seed(0)
    if gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    parts = []
    for _ in range(repeats + 1):  # the first is the warm-up
        sync(dev)
        t0 = time.perf_counter()
        with rt.autocast():
            batch, _, _, _ = collect_rollout(policy, head, reference, src, reward_fn, ppo_cfg, ppo_cfg.kl_coef, 1)
        sync(dev)
        t1 = time.perf_counter()
        ppo_update(model, opt, batch, ppo_cfg, gen, rt)
        sync(dev)
        parts.append({"rollout_s": t1 - t0, "update_s": time.perf_counter() - t1})
    T = batch.tokens.shape[1]  # = min(max_new_tokens, max_len): EOS is banned
    rollout_s, update_s = (statistics.median(p[k] for p in parts[1:]) for k in ("rollout_s", "update_s"))
    rollout_flops = 2 * forward_flops(cfg, B, S, B * N, T)  # sampling + reference
    update_flops = ppo_cfg.epochs * train_flops(cfg, B, S, B * N, T)
    seconds = rollout_s + update_s
    result["rl"] = {"prompts": B, "samples": N, "prompt_len": S, "new_tokens": T, "epochs": ppo_cfg.epochs,
                    "minibatches": len(torch.arange(B).chunk(ppo_cfg.minibatches)),  # as ppo_update splits
                    "seconds": seconds, "rollout_s": rollout_s, "update_s": update_s, "tok_s": B * N * T / seconds,
                    "flops": rollout_flops + update_flops,
                    "rollout_flops": rollout_flops, "update_flops": update_flops, "peak_gib": peak_gib()}
    del model, opt, policy, head, reference, batch
    peaks.append(matmul_peak(dev, dtype))

    peak = max(p["flops"] for p in peaks)
    result.update(peak_flops=peak, peak_n=peaks[0]["n"], peak_runs=[p["flops"] for p in peaks])
    result["sft"]["mfu"] = result["sft"]["flops"] / result["sft"]["seconds"] / peak
    rl = result["rl"]
    rl.update(mfu=rl["flops"] / rl["seconds"] / peak, rollout_mfu=rollout_flops / rollout_s / peak,
              update_mfu=update_flops / update_s / peak)
    return result


# ─── 8. the attention kernel: fused against the explicit softmax ─────────────────────────────────

def bench_attention(cfg: ModelConfig, repeats=5) -> list[dict]:
    """Why model.attend writes the softmax out in bf16 on the CPU: PyTorch's fused kernel against the
    explicit softmax (attend with the weights) at the preset's shapes, timed in turns — a sampling
    step (64 prompts × 4 samples, one query, 16 cached keys; forward) and an SFT decoder layer (64
    pairs, 32 queries over 32 keys; forward + backward). In bf16 the fused kernel is run both in bf16
    and as attend ran it before 41db03d, on q, k, v cast to fp32."""
    H, d, out = cfg.n_heads, cfg.d_kv, []
    for case, B, Tq, Tk, backward in (("sampling step", 256, 1, 16, False), ("SFT layer", 64, 32, 32, True)):
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, T, d, generator=g).to(dtype).requires_grad_(backward)
                       for T in (Tq, Tk, Tk))
            bias = torch.randn(1, H, Tq, Tk, generator=g)

            def timed(fn):
                def run():
                    o = fn()
                    if backward:
                        o.float().sum().backward()
                return run
            explicit = timed(lambda: attend(q, k, v, bias, need_weights=True)[0])
            sdpa = torch.nn.functional.scaled_dot_product_attention
            fused = {"fused": lambda: sdpa(q, k, v, attn_mask=bias.to(dtype), scale=1.0)}
            if dtype == torch.bfloat16:
                fused["fused in fp32"] = lambda: sdpa(q.float(), k.float(), v.float(), attn_mask=bias, scale=1.0).to(dtype)
            for name, fn in fused.items():
                ex_s, fu_s, ratio = paired_ratio(explicit, timed(fn), repeats)
                out.append({"case": case, "dtype": "fp32" if dtype == torch.float32 else "bf16", "fused": name,
                            "rows": B, "queries": Tq, "keys": Tk, "backward": backward,
                            "explicit_ms": 1e3 * ex_s, "fused_ms": 1e3 * fu_s, "fused_over_explicit": ratio})
    return out


# ─── the report ───────────────────────────────────────────────────────────────────────────────────

def flop_rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def table(results: dict) -> str:
    def row(name, ours, hf, ratio, target, met):
        return f"| {name} | {ours} | {hf} | {ratio} | {target} | {met} |"

    def yes(ok):
        return "yes" if ok else "**no**"

    lines = ["| benchmark | ours | HF T5 | ours/HF | target | met |", "| --- | ---: | ---: | ---: | --- | --- |"]
    if s := results.get("sampling"):
        hf, lo = s.get("hf_tok_s"), TARGETS["sampling"]
        lines.append(row("sampling + Ā, fp32 (new tok/s)", f"{s['ours_tok_s']:.0f}", f"{hf:.0f}" if hf else "–",
                         f"{s['ratio']:.2f}×" if hf else "–", f"≥ {lo:g}×", yes(s["ratio"] >= lo) if hf else "–"))
        hf_mfu = s.get("hf_mfu")
        lines.append(row(f"sampling + Ā, fp32: MFU (model FLOPs / s over the fp32 matmul peak, "
                         f"{flop_rate(s['peak_flops'])})", f"{100 * s['ours_mfu']:.1f} %",
                         f"{100 * hf_mfu:.1f} %" if hf_mfu else "–", "", f"≥ {100 * TARGETS['sampling_mfu']:g} %",
                         yes(s["ours_mfu"] >= TARGETS["sampling_mfu"])))
        lines.append(row("sampling + Ā, ours: bf16 autocast vs fp32, in turns (new tok/s; ratio bf16/fp32)",
                         f"{s['ours_bf16_tok_s']:.0f} vs {s['ours_fp32_tok_s_paired']:.0f}", "",
                         f"{s['bf16_ratio']:.2f}×", "", ""))
        if "ours_peak_mib" in s:
            hf_mib = s.get("hf_peak_mib")
            lines.append(row("sampling peak RSS growth (MiB)", f"{s['ours_peak_mib']:.0f}",
                             f"{hf_mib:.0f}" if hf_mib else "–",
                             f"{s['ours_peak_mib'] / hf_mib:.2f}×" if hf_mib else "–", "", ""))
    if s := results.get("sft"):
        hf, lo = s.get("hf_tok_s"), TARGETS["sft"]
        lines.append(row("SFT step (tok/s)", f"{s['ours_tok_s']:.0f}", f"{hf:.0f}" if hf else "–",
                         f"{s['ratio']:.2f}×" if hf else "–", f"≥ {lo:g}×", yes(s["ratio"] >= lo) if hf else "–"))
    if s := results.get("rl"):
        lines.append(row(f"one RL iteration ({s['prompts']} prompts × {s['samples']} samples, mean length "
                         f"{s['length']:.1f} of {s['padded']:.0f}; {s['total_s']:.2f} s): "
                         "sample / reward / reference / update",
                         " / ".join(f"{s[k]:.2f} s" for k in ("t_sample", "t_reward", "t_reference", "t_update")),
                         "", "", "", ""))
    trains = results.get("train", [])
    for s in trains:
        where = (f"{s['device']} {s['dtype']}" + ", compiled" * s["compile"]
                 + ", grad checkpointing" * s["grad_checkpoint"])
        runs = ", ".join(flop_rate(f).split()[0] for f in s["peak_runs"])
        lines.append(row(f"matmul peak, {where} (n = {s['peak_n']}; highest of {runs})", flop_rate(s["peak_flops"]),
                         "", "", "", ""))
        t = s["sft"]
        lines.append(row(f"SFT step, {where}: {t['pairs']} pairs × ({t['prompt_len']} + {t['response_len']}) "
                         f"tokens, {t['seconds']:.2f} s (tok/s · MFU)", f"{t['tok_s']:.0f} · {100 * t['mfu']:.1f} %",
                         "", "", "", ""))
        r = s["rl"]
        lines.append(row(f"one RL iteration, {where}: {r['prompts']} prompts × {r['samples']} samples × "
                         f"{r['new_tokens']} new tokens, {r['seconds']:.2f} s (new tok/s · MFU)",
                         f"{r['tok_s']:.0f} · {100 * r['mfu']:.1f} %", "", "", "", ""))
        lines.append(row(f"… rollout (sample, reward, reference) / update ({r['epochs']} epochs × "
                         f"{r['minibatches']} minibatches) (s · MFU)",
                         f"{r['rollout_s']:.2f} s · {100 * r['rollout_mfu']:.1f} % / "
                         f"{r['update_s']:.2f} s · {100 * r['update_mfu']:.1f} %", "", "", "", ""))
        if t["peak_gib"] is not None:
            lines.append(row("peak GPU memory allocated, SFT / RL (GiB)",
                             f"{t['peak_gib']:.1f} / {r['peak_gib']:.1f}", "", "", "", ""))
    if len(trains) == 2:  # the same benchmark in two precisions, one after the other in this run
        a, b = trains
        lines.append(row(f"speed-up of {b['dtype']} over {a['dtype']}: SFT step · RL iteration (rollout · update)",
                         f"{a['sft']['seconds'] / b['sft']['seconds']:.2f}× · {a['rl']['seconds'] / b['rl']['seconds']:.2f}× "
                         f"({a['rl']['rollout_s'] / b['rl']['rollout_s']:.2f}× · "
                         f"{a['rl']['update_s'] / b['rl']['update_s']:.2f}×)", "", "", "", ""))
    for a in results.get("attention", []):
        lines.append(row(f"attention, {a['dtype']}, {a['case']} ({a['rows']} rows, {a['queries']} × {a['keys']}"
                         f"{', forward + backward' if a['backward'] else ''}): {a['fused']} vs explicit softmax "
                         "(ms; ratio fused/explicit)", f"{a['fused_ms']:.2f} vs {a['explicit_ms']:.2f}", "",
                         f"{a['fused_over_explicit']:.2f}×", "", ""))
    if s := results.get("reward"):
        hi = TARGETS["reward_share"]
        lines.append(row(f"reward / generate ({s['reward_s'] * 1e3:.1f} ms / {s['generate_s'] * 1e3:.0f} ms)",
                         f"{100 * s['share']:.1f} %", "", "", f"< {100 * hi:g} %", yes(s["share"] < hi)))
    return "\n".join(lines)


BENCHMARKS = ("sampling", "sft", "reward", "rl", "attention", "train")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=list(PRESETS))
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated: {','.join(BENCHMARKS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--device", default="cpu", help="train only: cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--dtype", default="fp32",
                        help="train only: fp32, bf16 (autocast, fp32 master weights) or fp32,bf16 for both and "
                             "their ratio (default fp32)")
    parser.add_argument("--compile", action="store_true", help="train only: torch.compile the training passes")
    parser.add_argument("--grad-checkpoint", action="store_true", help="train only: recompute activations in backward")
    parser.add_argument("--batch-size", type=int, help="train only: SFT pairs per step (default: the preset's)")
    parser.add_argument("--prompts", type=int, help="train only: prompts per RL iteration (default: the preset's)")
    parser.add_argument("--init", help="train only: a Hugging Face T5-family checkpoint folder to load and measure")
    parser.add_argument("--out", default="runs/bench", help="folder of bench.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    if unknown := only - set(BENCHMARKS):
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    dtypes = args.dtype.split(",")
    if set(dtypes) - {"fp32", "bf16"} or len(set(dtypes)) != len(dtypes):
        parser.error(f"--dtype {args.dtype}: expected fp32, bf16 or fp32,bf16")
    from runtime import LaunchError, resolve_device
    try:
        device = resolve_device(args.device)
    except LaunchError as e:
        parser.error(str(e))
    cfg, results, m = PRESETS[args.size], {}, machine(device)
    if args.init:
        if only - {"train"}:
            parser.error("--init measures the train benchmark only: add --only train")
        cfg = ModelConfig(**read_config(args.init))  # load average before our own runs add to it
    if "sampling" in only:
        results["sampling"] = bench_sampling(cfg, repeats=args.repeats, size=args.size)
    if "sft" in only:
        results["sft"] = bench_sft_step(cfg, repeats=args.repeats)
    if "reward" in only:
        results["reward"] = bench_reward_share(cfg, repeats=args.repeats)
    if "rl" in only:
        results["rl"] = bench_rl_iteration(cfg, repeats=args.repeats, size=args.size)
    if "attention" in only:
        results["attention"] = bench_attention(cfg, repeats=args.repeats)
    if "train" in only:
        results["train"] = [bench_train(args.size, device, dtype, args.repeats, batch_size=args.batch_size,
                                        prompts=args.prompts, compile=args.compile,
                                        grad_checkpoint=args.grad_checkpoint, cfg=cfg, init=args.init)
                            for dtype in dtypes]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
          f"load {m['load_1min']:.1f}{gpu}, preset {args.size}, median of {args.repeats} after one warm-up\n")
    print(table(results))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {"machine": m, "size": args.size, "repeats": args.repeats, "command": " ".join(sys.argv), **results}
    (Path(args.out) / "bench.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
