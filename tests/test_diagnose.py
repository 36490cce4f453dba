"""diagnose.py: the rank statistics against scipy and at their edges, the empty answer's attention, and the
command on a real run directory (its outputs, and the refusal of data it cannot judge)."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from conftest import assert_one_line_error, run_cli
from diagnose import LENGTH_CORRECTED, VARIANTS, empty_rollout, length_slope, oracle_agreement, ranks, spearman
from model import ModelConfig, Transformer
from relevance import RelevanceJudge

FEW = settings(max_examples=60, deadline=None)
values = st.lists(st.integers(-3, 3).map(float), min_size=3, max_size=25)  # small integers: many ties


@pytest.mark.filterwarnings("ignore:An input array is constant")  # scipy's NaN, our 0
@FEW
@given(values, st.randoms(use_true_random=False))
def test_spearman_equals_scipy_with_ties(xs, rnd):
    ys = [x + rnd.choice((-1.0, 0.0, 1.0)) for x in xs]
    ours, theirs = spearman(xs, ys), spearmanr(xs, ys).statistic
    assert ours == pytest.approx(0.0 if math.isnan(theirs) else theirs, abs=1e-9)


@FEW
@given(values)
def test_ranks_sum_to_the_triangle_number_and_respect_order(xs):
    r = ranks(xs)
    assert sum(r) == pytest.approx(len(xs) * (len(xs) + 1) / 2)
    assert all((r[i] < r[j]) == (xs[i] < xs[j]) for i in range(len(xs)) for j in range(len(xs)))


@FEW
@given(st.lists(st.lists(st.integers(1, 5).map(float), min_size=2, max_size=6), min_size=1, max_size=8))
def test_oracle_agreement_is_one_for_the_oracle_zero_for_its_negative_half_for_a_constant(oracle):
    ordered = sum(a != b for o in oracle for i, a in enumerate(o) for b in o[i + 1 :])
    same, pairs = oracle_agreement(oracle, oracle)
    assert pairs == ordered
    if ordered:
        assert same == 1.0
        assert oracle_agreement([[-o for o in row] for row in oracle], oracle)[0] == 0.0
        assert oracle_agreement([[0.0] * len(row) for row in oracle], oracle)[0] == 0.5
    else:
        assert math.isnan(same)


def test_pairs_of_different_prompts_are_never_compared():
    # across prompts the reward is perfectly anti-correlated with the oracle; within each prompt it agrees
    assert oracle_agreement([[10.0, 11.0], [0.0, 1.0]], [[1.0, 2.0], [4.0, 5.0]]) == (1.0, 2)


@FEW
@given(st.lists(st.lists(st.integers(1, 30).map(float), min_size=2, max_size=5), min_size=1, max_size=6),
       st.floats(-1, 1), st.lists(st.floats(-5, 5), min_size=6, max_size=6))
def test_length_slope_recovers_a_linear_law_whatever_each_prompts_offset(lengths, slope, offsets):
    rewards = [[offsets[p] + slope * n for n in row] for p, row in enumerate(lengths)]
    if any(len(set(row)) > 1 for row in lengths):
        assert length_slope(rewards, lengths) == pytest.approx(slope, abs=1e-9)
    else:
        assert length_slope(rewards, lengths) == 0.0


def test_the_empty_answer_is_eos_with_a_distribution_over_the_real_prompt_tokens():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_heads=2, d_kv=16, d_ff=64, n_enc_layers=1,
                                    n_dec_layers=2)).eval()
    src = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    r = empty_rollout(model, src, capture_last=1)
    assert r.tokens.tolist() == [[1], [1]] and r.mask.all() and r.cross_attn.shape == (2, 1, 4)
    assert torch.allclose(r.cross_attn.sum(-1), torch.ones(2, 1)) and r.cross_attn[1, 0, 3] == 0


@pytest.fixture(scope="module")
def diagnosed(run_dir):
    if not (run_dir / "judge.pt").exists():
        RelevanceJudge.train(run_dir / "judge.pt", n_train=60, n_val=20)
    proc = run_cli("diagnose", "--out", str(run_dir), "--prompts", "6", "--no-reward-models", "--samples", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir, proc


def test_diagnose_writes_every_rewards_statistics(diagnosed):
    run, proc = diagnosed
    report = json.loads((run / "diagnose.json").read_text())
    assert set(report["results"]) == {"qa", "instruct"}
    for r in report["results"].values():
        assert r["prompts"] == 6 and r["samples"] == 3
        rewards = {k for k, v in r.items() if isinstance(v, dict) and "oracle_agreement" in v}
        assert rewards == {"cagsr", "coverage", "focus", "−repeat", "cagsr-no-coverage", "cagsr-no-focus",
                           "cagsr-no-repeat", *VARIANTS, LENGTH_CORRECTED}
        for name in rewards:
            m = r[name]
            assert math.isnan(m["oracle_agreement"]) or 0 <= m["oracle_agreement"] <= 1
            assert -1 <= m["relevance_rho"] <= 1 and -1 <= m["length_rho"] <= 1 and 0 <= m["empty_wins"] <= 1
    assert "oracle agreement" in proc.stdout and (run / "diagnose.md").read_text() in proc.stdout
    assert (run / "diagnose.png").stat().st_size > 0


def test_diagnose_refuses_user_data(run_dir, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "Say hi.", "response": "Hi."}\n' * 12)
    assert_one_line_error(run_cli("diagnose", "--out", str(run_dir), "--data", str(data)), "synthetic")
