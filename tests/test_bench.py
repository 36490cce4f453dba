"""bench.py runs end to end on toy sizes, without the Hugging Face baseline (transformers not needed)."""
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import (bench_attention, bench_reward_share, bench_rl_iteration, bench_sampling, bench_train, forward_flops,
                   matmul_params, table, train_flops)
from model import PRESETS, Transformer

CFG = replace(PRESETS["tiny"], vocab_size=97, d_model=32, n_heads=4, d_kv=8, d_ff=64, max_len=16)


def test_sampling_and_reward_benchmarks_report_positive_throughput():
    sampling = bench_sampling(CFG, prompts=2, samples=2, new_tokens=4, prompt_len=5, repeats=1, baseline=False)
    assert sampling["new_tokens"] == 2 * 2 * 4
    assert sampling["ours_tok_s"] > 0 and sampling["ours_bf16_tok_s"] > 0
    assert 0 < sampling["ours_mfu"] < 1 and "hf_mfu" not in sampling  # no baseline run, no baseline MFU
    reward = bench_reward_share(CFG, prompts=2, samples=2, new_tokens=4, prompt_len=6, repeats=1)
    assert reward["generate_s"] > 0 and 0 < reward["share"]
    report = table({"sampling": sampling, "reward": reward})
    assert "sampling" in report and "sampling + Ā, fp32: MFU" in report and "reward / generate" in report


def test_rl_iteration_benchmark_splits_the_time_into_its_parts():
    rl = bench_rl_iteration(CFG, prompts=2, prompt_len=5, repeats=1)
    parts = ("t_sample", "t_reward", "t_reference", "t_update")
    assert all(rl[k] > 0 for k in parts) and abs(rl["total_s"] - sum(rl[k] for k in parts)) < 1e-9
    assert 1 <= rl["length"] <= rl["padded"] <= CFG.max_len
    assert "one RL iteration" in table({"rl": rl})


def test_attention_benchmark_times_every_case_against_the_explicit_softmax():
    rows = bench_attention(CFG, repeats=1)
    # two cases × (fp32: fused; bf16: fused, fused in fp32)
    assert [(r["case"], r["dtype"], r["fused"]) for r in rows] == [
        (case, dtype, fused) for case in ("sampling step", "SFT layer")
        for dtype, fused in (("fp32", "fused"), ("bf16", "fused"), ("bf16", "fused in fp32"))]
    assert all(r["explicit_ms"] > 0 and r["fused_ms"] > 0 for r in rows)
    assert table({"attention": rows}).count("attention, ") == 6


def test_train_benchmark_reports_tokens_per_second_and_an_mfu_below_one():
    train = bench_train("tiny", repeats=1, batch_size=4, prompts=2)  # the tiny model, a few pairs/prompts
    assert train["peak_flops"] > 0
    for part in ("sft", "rl"):
        assert train[part]["tok_s"] > 0 and 0 < train[part]["mfu"] < 1, (part, train[part])
    assert train["sft"]["tokens"] == 4 * (32 + 32) and train["rl"]["new_tokens"] == 48  # EOS banned
    report = table({"train": [train]})
    assert "SFT step, cpu fp32" in report and "one RL iteration, cpu fp32" in report and "matmul peak" in report


def test_model_flops_agree_with_a_hand_count_and_with_torch_flop_counter():
    cfg = replace(CFG, d_kv=4, n_enc_layers=1, n_dec_layers=1)  # D 32, I = 4 heads · 4 = 16, gated F 64, V 97
    D, I, F, V = 32, 16, 64, 97
    # by hand: encoder layer Q,K,V,O + three feed-forward matrices, plus the decoder's cross-attention K,V
    # (on the prompt); decoder layer self Q,K,V,O, cross Q,O, feed-forward, plus the output matrix
    assert matmul_params(cfg) == (4 * D * I + 3 * D * F + 2 * D * I, 6 * D * I + 3 * D * F + V * D) == (9216, 12320)
    # every parameter is a matmul weight except the embedding lookup, position biases and norms
    norms, position = (2 + 3 + 2) * D, 2 * cfg.num_buckets * cfg.n_heads
    assert Transformer(cfg).num_parameters() == sum(matmul_params(cfg)) + V * D + position + norms

    B, N, S, T = 2, 3, 5, 7  # 2 prompts, 3 responses each
    attention = 4 * I * (B * S * S + B * N * (T * (T + 1) // 2 + T * S))  # encoder, causal self, cross pairs
    assert forward_flops(cfg, B, S, B * N, T) == 2 * (9216 * B * S + 12320 * B * N * T) + attention
    assert train_flops(cfg, B, S, B * N, T) == 3 * forward_flops(cfg, B, S, B * N, T)

    # torch's own count of the matrix products (nn.Linear and the output layer) of a forward and a backward
    model = Transformer(cfg)
    src, tgt = torch.randint(3, V, (B, S)), torch.randint(3, V, (B * N, T))
    counter = FlopCounterMode(display=False)
    with counter:
        model(src, tgt)[0].sum().backward()
    products = sum(v for k, v in counter.get_flop_counts()["Global"].items() if str(k) in ("aten.mm", "aten.addmm"))
    assert products == train_flops(cfg, B, S, B * N, T) - 3 * attention  # 6·N per token exactly

    # at the tiny preset's shapes, the 6·N part dominates: attention is a few per cent
    tiny = PRESETS["tiny"]
    full, no_attention = forward_flops(tiny, 64, 32, 64, 32), forward_flops(tiny, 64, 32, 64, 32, attention=False)
    assert 0.9 < no_attention / full < 1
