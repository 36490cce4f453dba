"""bench.py runs end to end on toy sizes, without the Hugging Face baseline (transformers not needed)."""
from dataclasses import replace

from bench import bench_reward_share, bench_rl_iteration, bench_sampling, table
from model import PRESETS

CFG = replace(PRESETS["tiny"], vocab_size=97, d_model=32, n_heads=4, d_ff=64, max_len=16)


def test_sampling_and_reward_benchmarks_report_positive_throughput():
    sampling = bench_sampling(CFG, prompts=2, samples=2, new_tokens=4, prompt_len=5, repeats=1, baseline=False)
    assert sampling["new_tokens"] == 2 * 2 * 4
    assert sampling["ours_tok_s"] > 0 and sampling["ours_bf16_tok_s"] > 0
    reward = bench_reward_share(CFG, prompts=2, samples=2, new_tokens=4, prompt_len=6, repeats=1)
    assert reward["generate_s"] > 0 and 0 < reward["share"]
    report = table({"sampling": sampling, "reward": reward})
    assert "sampling" in report and "reward / generate" in report


def test_rl_iteration_benchmark_splits_the_time_into_its_parts():
    rl = bench_rl_iteration(CFG, prompts=2, samples=2, new_tokens=4, prompt_len=5, repeats=1)
    parts = ("t_sample", "t_reward", "t_reference", "t_update")
    assert all(rl[k] > 0 for k in parts) and abs(rl["total_s"] - sum(rl[k] for k in parts)) < 1e-9
    assert "one RL iteration" in table({"rl": rl})
