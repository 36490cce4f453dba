"""Benchmarks of CAGSR on the machine at hand: speed and memory, ours against Hugging Face T5.

    python bench.py [--size tiny] [--only sampling,sft,reward] [--repeats 3]

prints a Markdown table and writes runs/bench/bench.json. Each timing is one warm-up call, then the
median of `--repeats` calls. The baseline is `T5ForConditionalGeneration` of the same width, depth,
heads, d_ff and vocabulary, randomly initialised from a config (no weights are downloaded); it needs
the extra of requirements-bench.txt. Never run by the tests, except a smoke test of small sizes.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from model import PRESETS, ModelConfig, Transformer
from reward import cagsr_reward

HERE = Path(__file__).resolve().parent
TARGETS = {"sampling": 2.0, "sft": 1.0, "reward_share": 0.05}  # ours/HF ≥, ours/HF ≥, reward/generate <


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown")
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "load_1min": os.getloadavg()[0]}  # other work on the machine skews every number below


def median_seconds(fn, repeats: int) -> float:
    """One warm-up call (allocator, kernel selection), then the median of `repeats` timed calls."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_ids(B: int, S: int, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """[B,S] ids ≥ 4 (no pad, bos, eos or unk): every prompt is full length."""
    return torch.randint(4, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


# ─── the two models ───────────────────────────────────────────────────────────────────────────────

def ours_without_eos(cfg: ModelConfig) -> Transformer:
    """Our model with EOS added to the tokens it may never emit (the `banned` buffer), so every sample
    runs the full number of steps — the counterpart of HF's `min_new_tokens`."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.banned[cfg.eos_id] = True
    return model


def hf_t5(cfg: ModelConfig):
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
                      num_layers=cfg.n_enc_layers, num_decoder_layers=cfg.n_dec_layers, num_heads=cfg.n_heads,
                      dropout_rate=0.0, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
                      decoder_start_token_id=cfg.bos_id)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")  # the only one that returns attention weights
    return model


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
    autocast); with `size`, also the peak memory of each in a fresh process."""
    src, kw = sampling_case(cfg, prompts, samples, new_tokens, prompt_len)  # src [B,S]
    ours = ours_without_eos(cfg)
    steps = []

    def run_ours():
        rollout = ours.generate(src, capture_last=1, **kw)
        steps.append(rollout.tokens.shape[1])  # steps actually run: = new_tokens, EOS being banned

    def run_ours_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run_ours()

    tokens = prompts * samples * new_tokens
    result = {"new_tokens": tokens}
    with torch.no_grad():
        result["ours_tok_s"] = tokens / median_seconds(run_ours, repeats)
        result["ours_bf16_tok_s"] = tokens / median_seconds(run_ours_bf16, repeats)
        if baseline:
            hf = hf_t5(cfg)
            result["hf_tok_s"] = tokens / median_seconds(lambda: hf_sample(hf, src, samples, new_tokens), repeats)
            result["ratio"] = result["ours_tok_s"] / result["hf_tok_s"]
    assert set(steps) == {new_tokens}, f"a rollout stopped early: {set(steps)} steps"
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
    decoder_in = torch.cat([torch.full((pairs, 1), cfg.bos_id), response[:, :-1]], dim=1)  # [B,T]: BOS + y<t
    tokens = pairs * (prompt_len + response_len)

    def ours_loss(model):
        logits, _ = model(src, decoder_in)  # [B,T,V]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), response.flatten())

    def hf_loss(model):  # T5 shifts `labels` right behind decoder_start_token_id = BOS: the same input
        return model(input_ids=src, labels=response).loss

    def step_timer(model, loss_fn):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            opt.step()
        return tokens / median_seconds(step, repeats)

    torch.manual_seed(0)
    result = {"tokens": tokens, "ours_tok_s": step_timer(Transformer(cfg), ours_loss)}
    if baseline:
        result["hf_tok_s"] = step_timer(hf_t5(cfg), hf_loss)
        result["ratio"] = result["ours_tok_s"] / result["hf_tok_s"]
    return result


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

def bench_rl_iteration(cfg: ModelConfig, prompts=64, samples=4, new_tokens=32, prompt_len=24, repeats=3) -> dict:
    """Seconds of one CAGSR iteration (ppo.collect_rollout + ppo.update with the tiny preset's PPO
    settings) split into sampling, reward, reference log-probs and the PPO update; median per part."""
    import copy

    from ppo import ActorCritic, PPOConfig, ValueHead, collect_rollout, ppo_update
    from reward import AttentionReward

    pieces = ["<pad>", "<s>", "</s>", "<unk>"] + [f"\u2581w{chr(97 + i % 26)}{i // 26}" for i in range(cfg.vocab_size - 4)]
    reward_fn = AttentionReward({}, pieces)
    policy = ours_without_eos(cfg)
    reference = copy.deepcopy(policy).requires_grad_(False)
    head = ValueHead(cfg.d_model)
    ppo_cfg = PPOConfig(batch_prompts=prompts, samples=samples, max_new_tokens=new_tokens)
    opt = torch.optim.Adam([*policy.parameters(), *head.parameters()], lr=ppo_cfg.lr)
    src, gen = random_ids(prompts, prompt_len, cfg, seed=6), torch.Generator().manual_seed(0)
    parts = []
    for _ in range(repeats + 1):  # the first is the warm-up
        batch, _, _, times = collect_rollout(policy, head, reference, src, reward_fn, ppo_cfg, 0.05, 1)
        start = time.perf_counter()
        ppo_update(ActorCritic(policy, head), opt, batch, ppo_cfg, gen)
        parts.append({**times, "t_update": time.perf_counter() - start})
    result = {k: statistics.median(p[k] for p in parts[1:]) for k in parts[0]}
    result["total_s"] = sum(result.values())
    return result


# ─── the report ───────────────────────────────────────────────────────────────────────────────────

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
        lines.append(row("sampling + Ā, ours bf16 autocast vs HF fp32", f"{s['ours_bf16_tok_s']:.0f}",
                         f"{hf:.0f}" if hf else "–", f"{s['ours_bf16_tok_s'] / hf:.2f}×" if hf else "–", "", ""))
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
        lines.append(row(f"one RL iteration ({s['total_s']:.2f} s): sample / reward / reference / update",
                         " / ".join(f"{s[k]:.2f} s" for k in ("t_sample", "t_reward", "t_reference", "t_update")),
                         "", "", "", ""))
    if s := results.get("reward"):
        hi = TARGETS["reward_share"]
        lines.append(row(f"reward / generate ({s['reward_s'] * 1e3:.1f} ms / {s['generate_s'] * 1e3:.0f} ms)",
                         f"{100 * s['share']:.1f} %", "", "", f"< {100 * hi:g} %", yes(s["share"] < hi)))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=list(PRESETS))
    parser.add_argument("--only", default="sampling,sft,reward,rl", help="comma-separated: sampling,sft,reward,rl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--out", default="runs/bench", help="folder of bench.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    if unknown := only - {"sampling", "sft", "reward", "rl"}:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    cfg, results, m = PRESETS[args.size], {}, machine()  # load average before our own runs add to it
    if "sampling" in only:
        results["sampling"] = bench_sampling(cfg, repeats=args.repeats, size=args.size)
    if "sft" in only:
        results["sft"] = bench_sft_step(cfg, repeats=args.repeats)
    if "reward" in only:
        results["reward"] = bench_reward_share(cfg, repeats=args.repeats)
    if "rl" in only:
        results["rl"] = bench_rl_iteration(cfg, repeats=args.repeats)
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
          f"load {m['load_1min']:.1f}, preset {args.size}, median of {args.repeats} after one warm-up\n")
    print(table(results))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {"machine": m, "size": args.size, "repeats": args.repeats, "command": " ".join(sys.argv), **results}
    (Path(args.out) / "bench.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
