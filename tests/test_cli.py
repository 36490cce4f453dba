"""The command line and the SFT stage: training lowers the loss, an interrupted run resumes to the
same numbers, and bad input is one clear line on stderr with a non-zero exit — never a traceback,
never damage to what is already written."""
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import rundir
import runtime
import sft
from data import load_split
from data.tokenizer import train_tokenizer, training_texts
from model import PRESETS

SMALL = replace(PRESETS["tiny"], d_model=64, n_heads=2, d_kv=32, d_ff=128, n_enc_layers=1, n_dec_layers=2)


from conftest import assert_one_line_error, interrupted_at_step, run_cli


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(training_texts(), PRESETS["tiny"].vocab_size, tmp_path_factory.mktemp("tok") / "t.model")


@pytest.fixture(scope="module")
def pairs(tok):
    records = load_split("qa", "train")[:48] + load_split("instruct", "train")[:16]
    return sft.encode_pairs(tok, records, SMALL.max_len)


@pytest.mark.learning
def test_thirty_sft_steps_lower_the_loss(pairs, tmp_path, seed, record_property):
    cfg = sft.SFTConfig(steps=30, batch_size=16, lr=3e-3, warmup=5, eval_every=30, eval_pairs=16)
    sft.train_sft(SMALL, cfg, pairs, pairs[:16], tmp_path, seed=seed, quiet=True)
    rows = rundir.Metrics(tmp_path / "metrics.jsonl").read("sft")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30
    ratio = sum(losses[-5:]) / sum(losses[:5])  # 0.56–0.60 for seeds 0–4
    record_property("last5_over_first5", ratio)
    assert ratio < 0.75
    assert rows[-1]["val_loss"] < losses[0]


def test_interrupted_sft_resumes_to_the_same_numbers(pairs, tmp_path, monkeypatch):
    cfg = sft.SFTConfig(steps=16, batch_size=16, lr=3e-3, warmup=2, eval_every=8, eval_pairs=16)
    whole = sft.train_sft(SMALL, cfg, pairs, pairs[:16], tmp_path / "whole", quiet=True)[0]
    run = tmp_path / "cut"
    with interrupted_at_step(monkeypatch, 11):
        sft.train_sft(SMALL, cfg, pairs, pairs[:16], run, quiet=True)
    assert torch.load(run / "sft-last.pt", weights_only=True)["step"] == 8
    resumed = sft.train_sft(SMALL, cfg, pairs, pairs[:16], run, quiet=True)[0]
    a, b = (rundir.Metrics(p / "metrics.jsonl").read("sft") for p in (tmp_path / "whole", run))
    assert [r["step"] for r in b] == list(range(1, 17))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_learning_rate_warms_up_then_decays():
    cfg = sft.SFTConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [sft.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_prepare_prints_length_statistics(run_dir):
    proc = run_cli("prepare", "--out", str(run_dir))
    assert proc.returncode == 0 and "qa" in proc.stdout and "p50" in proc.stdout


def test_sample_prints_an_answer_and_draws_a_heat_map(run_dir):
    proc = run_cli("sample", "--prompt", "What is the capital of Pestalia?", "--out", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "attention.png").stat().st_size > 0


def test_unknown_size_is_one_line(tmp_path):
    """In a real process, as a shell sees it: one line on stderr and exit status 2."""
    proc = run_cli("sft", "--size", "huge", "--out", str(tmp_path), process=True)
    assert_one_line_error(proc, "huge")
    assert proc.returncode == 2


def test_missing_data_is_one_line(tmp_path):
    assert_one_line_error(run_cli("prepare", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)),
                          "nowhere")


def test_missing_checkpoint_is_one_line(tmp_path, run_dir):
    proc = run_cli("eval", "--out", str(run_dir), "--checkpoint", str(tmp_path / "none.pt"))
    assert_one_line_error(proc, "none.pt", "not found")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrupt_checkpoint_and_tokenizer_are_one_line_and_damage_nothing(tmp_path, run_dir):
    before = {p.name: digest(p) for p in run_dir.iterdir() if p.is_file()}
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli("eval", "--out", str(run_dir), "--checkpoint", str(bad)), "corrupt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.model").write_bytes(b"garbage")
    assert_one_line_error(run_cli("sft", "--out", str(other)), "tokenizer.model")
    assert {p.name: digest(p) for p in run_dir.iterdir() if p.is_file()} == before


def test_prompt_longer_than_the_model_reads_is_one_line(run_dir):
    proc = run_cli("sample", "--prompt", "word " * 200, "--out", str(run_dir))
    assert_one_line_error(proc, "at most 64")
    assert json.loads((run_dir / "config.json").read_text())["size"] == "tiny"


def test_prepare_refuses_a_record_longer_than_the_model_and_keeps_no_tokenizer(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": f"answer {i}."}) + "\n"
                            for i in range(30)) + json.dumps({"prompt": "long?", "response": "word " * 80}) + "\n")
    proc = run_cli("prepare", "--out", str(tmp_path / "run"), "--data", str(data))
    assert_one_line_error(proc, "mine.jsonl:31", "at most 64")
    assert not list((tmp_path / "run").glob("tokenizer*"))  # a rerun on fixed data trains a new tokenizer


def test_a_run_directory_refuses_other_data_than_it_was_prepared_from(run_dir):
    before = (run_dir / "sft.pt").read_bytes()
    assert_one_line_error(run_cli("sft", "--out", str(run_dir), "--data", "data/hard", "--force"), "prepared from --data")
    assert_one_line_error(run_cli("table1", "--out", str(run_dir), "--methods", "no-rl"), "prepared from --data")
    assert (run_dir / "sft.pt").read_bytes() == before


def test_memory_plan_counts_the_real_model_and_grows_with_size():
    import torch
    from model import Transformer

    for size in ("tiny", "1.3b"):
        with torch.device("meta"):
            real = Transformer(PRESETS[size]).num_parameters()
        plan = runtime.memory_plan(size)
        assert plan["parameters"] == real
        assert plan["adam"] == pytest.approx(2 * plan["weights"])  # two fp32 moments per fp32 weight
    assert runtime.memory_plan("1.3b", grad_checkpoint=True)["activations"] < runtime.memory_plan("1.3b")["activations"]
    assert runtime.memory_plan("tiny")["total"] < runtime.memory_plan("1.3b")["total"]


def test_every_config_field_is_a_flag_with_its_comment_as_help():
    """The flags are made from the config dataclasses: each field is a flag whose help is the field's
    comment, a flag given replaces the preset's value, a flag not given leaves it alone."""
    import dataclasses

    import cagsr
    from baselines import RewardModelConfig
    from ppo import PPOConfig
    from reward import RewardConfig
    from rl import RL_PRESETS
    from sft import SFT_PRESETS, SFTConfig

    p = cagsr.parser()
    for command, classes in (("sft", (SFTConfig, RewardConfig)), ("rl", (PPOConfig, RewardConfig, RewardModelConfig))):
        sub = p._subparsers._group_actions[0].choices[command]
        helps = {a.dest: a.help for a in sub._actions}
        for cls in classes:
            for f in dataclasses.fields(cls):
                assert f.name in helps, (command, f.name)
                assert cagsr.field_help(cls)[f.name] in helps[f.name]
    args = p.parse_args(["rl", "--iterations", "3", "--no-whiten", "--beta", "0"])
    assert cagsr.ppo_config(args) == dataclasses.replace(RL_PRESETS["tiny"], iterations=3, whiten=False)
    assert cagsr.reward_configs(args)[0] == RewardConfig(beta=0.0)
    args = p.parse_args(["sft", "--warmup", "7"])
    assert cagsr.sft_config(args) == dataclasses.replace(SFT_PRESETS["tiny"], warmup=7)
    assert cagsr.sft_config(p.parse_args(["--lr", "0.5"])) == SFT_PRESETS["tiny"]  # the pipeline's --lr is RL's
