"""`python cagsr.py table1` in miniature: every stage of the comparison runs, reuses what is finished,
and writes results.json in the documented shape, results.md beside the paper's numbers, and a chart;
and the statistics it reports, as properties of the bootstrap."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error, run_cli
from relevance import RelevanceJudge
from table1 import aggregate, bootstrap_ci, verdict

MINI = ["--data", "data", "--diagnose-prompts", "4", "--iterations", "1", "--batch-prompts", "4", "--samples", "2", "--eval-prompts", "4", "--rm-steps", "2",
        "--synthetic-prompts", "20", "--held-out-prompts", "50", "--seeds", "2"]
METHODS = "no-rl,cagsr,cagsr-no-focus,human-pref,hybrid"


@pytest.fixture(scope="module")
def table_run(run_dir):
    judge, accuracy = RelevanceJudge.train(run_dir / "judge.pt", n_train=60, n_val=20)
    proc = run_cli("table1", "--out", str(run_dir), "--methods", METHODS, *MINI)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir, proc


@pytest.mark.slow  # table_run trains and scores five methods × two seeds
def test_table1_writes_results_in_the_documented_shape(table_run):
    run, proc = table_run
    results = json.loads((run / "table1" / "results.json").read_text())
    assert set(results) == {"qa", "instruct"}
    for dataset in results.values():
        assert set(dataset) == set(METHODS.split(","))
        for method in dataset.values():
            for metric in ("relevance", "rouge_l", "oracle", "perplexity"):
                cell = method[metric]
                assert len(cell["seeds"]) == 2 and cell["std"] >= 0
                assert min(cell["seeds"]) <= cell["mean"] <= max(cell["seeds"])
            assert 0 <= method["relevance"]["mean"] <= 1 and 1 <= method["oracle"]["mean"] <= 5
        for method, cell in dataset.items():  # an interval on every per-prompt metric, a paired difference but for No-RL
            assert cell["relevance"]["ci95"][0] <= cell["relevance"]["mean"] <= cell["relevance"]["ci95"][1]
            assert ("diff" in cell["oracle"]) == (method != "no-rl")
    scores = json.loads((run / "table1" / "cagsr-seed1" / "scores.json").read_text())
    assert len(scores["qa"]["per_prompt"]["fact_accuracy"]) == 4 and len(scores["instruct"]["per_prompt"]["item_recall"]) == 4
    md = (run / "table1" / "results.md").read_text()
    assert "0.83" in md and "ablations" in md and "hybrid" in md  # the paper's CAGSR relevance sits beside ours
    assert "reward diagnostic" in md and "paired difference to No-RL" in md and "item recall" in md
    assert json.loads((run / "table1" / "run.json").read_text())["command"].startswith("python ")
    assert (run / "table1" / "results.png").stat().st_size > 0
    assert (run / "rm-human.pt").exists() and (run / "table1" / "cagsr-seed1" / "rl.pt").exists()


@pytest.mark.slow  # table_run trains and scores five methods × two seeds
def test_rerun_reuses_finished_runs(table_run):
    run, _ = table_run
    before = (run / "table1" / "cagsr-seed0" / "scores.json").stat().st_mtime_ns
    proc = run_cli("table1", "--out", str(run), "--methods", "cagsr", *MINI)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "table1" / "cagsr-seed0" / "scores.json").stat().st_mtime_ns == before
    assert "reusing" in proc.stdout or "rl:" not in proc.stdout


def test_unknown_method_is_one_line(run_dir):
    assert_one_line_error(run_cli("table1", "--out", str(run_dir), "--methods", "cagsr,magic"), "magic")


def test_empty_results_directory_is_one_line(tmp_path):
    assert_one_line_error(run_cli("table1", "--report-only", "--out", str(tmp_path)), "no finished")


def test_tampered_judge_is_one_line(tmp_path, run_dir):
    (tmp_path / "judge.pt").write_bytes(b"tampered")
    for name in ("tokenizer.model", "idf.json", "sft.pt"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    assert_one_line_error(run_cli("table1", "--out", str(tmp_path), "--methods", "no-rl", *MINI), "judge.pt")


# --- the statistics ------------------------------------------------------------------------------

FEW = settings(max_examples=30, deadline=None, derandomize=True)
scores = st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=40)


@FEW
@given(scores, st.integers(1, 3), st.floats(-2, 2, allow_nan=False))
def test_bootstrap_interval_holds_the_mean_and_moves_with_a_shift(xs, seeds, shift):
    x = np.array([xs] * seeds)
    lo, hi = bootstrap_ci(x)
    assert lo - 1e-12 <= x.mean() <= hi + 1e-12 or lo == hi  # a percentile interval of a mean of bounded scores
    assert np.allclose(bootstrap_ci(x + shift), [lo + shift, hi + shift])
    assert bootstrap_ci(np.full_like(x, xs[0])) == pytest.approx([xs[0], xs[0]])


def test_bootstrap_interval_narrows_with_more_prompts_and_widens_with_seed_spread():
    rng = np.random.default_rng(0)
    width = lambda x: np.subtract(*bootstrap_ci(x)[::-1])
    assert width(rng.random((1, 1000))) < 0.5 * width(rng.random((1, 50)))
    same = np.tile(rng.random(200), (3, 1))
    assert width(same + np.array([[0.0], [0.3], [0.6]])) > 3 * width(same)  # seeds that disagree widen it


def test_a_difference_is_a_gain_or_loss_only_when_its_interval_excludes_zero():
    assert verdict([0.01, 0.2]) == "gain" and verdict([-0.2, -0.01]) == "loss" and verdict([-0.1, 0.1]) == "no difference"
    base = {"relevance": 0.5, "per_prompt": {"relevance": [0.5] * 100}}
    better = {"relevance": 0.6, "per_prompt": {"relevance": [0.6] * 100}}
    noisy = {"relevance": 0.5, "per_prompt": {"relevance": [0.0, 1.0] * 50}}
    out = aggregate({"qa": {"no-rl": [base], "cagsr": [better, better], "focus": [noisy]}})["qa"]
    assert out["cagsr"]["relevance"]["diff"] == {"mean": pytest.approx(0.1), "ci95": pytest.approx([0.1, 0.1]), "verdict": "gain"}
    assert out["focus"]["relevance"]["diff"]["verdict"] == "no difference"
    assert "diff" not in out["no-rl"]["relevance"]

