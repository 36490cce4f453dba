"""Scaling flags: gradient checkpointing and bf16 autocast change memory and speed, not the maths;
torchrun with DDP or FSDP (gloo on CPU) gives the losses of one process with the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_cli
from model import PRESETS, Transformer
from runtime import setup

CFG = PRESETS["tiny"]


def loss_and_grads(model, src, tgt):
    logits, _ = model(src, tgt)
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt)
    model.zero_grad()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_recomputes_the_same_gradients():
    torch.manual_seed(0)
    model, src, tgt = Transformer(CFG), torch.randint(4, 100, (4, 12)), torch.randint(4, 100, (4, 9))
    loss, grads = loss_and_grads(model, src, tgt)
    model.grad_checkpoint = True
    loss_ckpt, grads_ckpt = loss_and_grads(model, src, tgt)
    assert loss_ckpt == loss
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.learning
def test_bf16_autocast_keeps_fp32_master_weights_and_close_losses(seed, record_property):
    torch.manual_seed(seed)
    model, src, tgt = Transformer(CFG), torch.randint(4, 100, (4, 12)), torch.randint(4, 100, (4, 9))
    loss, _ = loss_and_grads(model, src, tgt)
    with setup("cpu", "bf16").autocast():
        logits, _ = model(src, tgt)
    assert logits.dtype == torch.bfloat16  # the matmuls ran in bf16 ...
    loss_bf16 = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), tgt)
    loss_bf16.backward()
    record_property("relative_loss_difference", abs(loss_bf16.item() - loss) / loss)
    assert loss_bf16.item() == pytest.approx(loss, rel=1e-2)
    # ... not the weights
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("flags, words", [(["--device", "cuda"], ["--device cuda", "no CUDA"]),
                                         (["--device", "tpu"], ["--device tpu"]),
                                         (["--distributed", "ddp"], ["torchrun"])])
def test_impossible_launch_settings_are_one_line_errors(run_dir, flags, words):
    assert_one_line_error(run_cli("sft", "--out", str(run_dir), "--steps", "1", *flags), *words)


def test_distributed_is_only_for_sft_and_rl(run_dir):
    assert_one_line_error(run_cli("eval", "--out", str(run_dir), "--distributed", "ddp"), "sft and rl")


def torchrun(nproc, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(ROOT / "cagsr.py"), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def fresh_run(run_dir, tmp_path, name):
    out = tmp_path / name
    out.mkdir()
    for f in ("tokenizer.model", "idf.json", "sft.pt"):
        shutil.copy(run_dir / f, out / f)
    return out


@pytest.mark.slow
def test_torchrun_sft_matches_one_process(run_dir, tmp_path):
    """4 SFT steps on a global batch of 8 pairs: one process, 2 DDP ranks, 2 FSDP ranks. Each rank
    takes 4 pairs and weights its loss by its share of the tokens, so the losses agree to float
    rounding (tolerance 1e-5: the ranks pad to shorter lengths and sum in another order)."""
    sft = ["sft", "--steps", "4", "--batch-size", "8", "--force"]
    single = fresh_run(run_dir, tmp_path, "single")
    assert run_cli(*sft, "--out", str(single)).returncode == 0
    expected = rows(single / "metrics.jsonl")
    for mode in ("ddp", "fsdp"):
        out = fresh_run(run_dir, tmp_path, mode)
        torchrun(2, *sft, "--out", str(out), "--distributed", mode)
        got = rows(out / "metrics.jsonl")
        assert [r["step"] for r in got] == [1, 2, 3, 4]  # one writer: rank 0
        for a, b in zip(expected, got):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), mode
        assert got[-1]["val_loss"] == pytest.approx(expected[-1]["val_loss"], abs=1e-5), mode
        assert torch.load(out / "sft.pt", weights_only=True)["model"].keys() == \
            torch.load(single / "sft.pt", weights_only=True)["model"].keys()


@pytest.mark.slow
def test_torchrun_rl_matches_one_process(run_dir, tmp_path):
    """One PPO iteration of 8 prompts × 2 samples, one epoch of one minibatch: a single torchrun
    process against 2 DDP and 2 FSDP ranks (4 prompts each). The ranks slice their sampling noise from
    the one global draw, so they sample the same responses as one process — up to float rounding: a
    rank's batch of 4 takes other matmul kernels than the batch of 8, its logits differ by ~1e-7, and
    the 2-step SFT policy is nearly uniform (entropy ≈ 6.8 nats), so on some CPUs one of the 768 draws
    lands on the other side of a boundary (measured on an Intel Xeon: reward 1.7e-4 and gradient norm
    4.8e-3 apart, relatively). So DDP and FSDP, whose ranks run the same shapes, agree to 1e-4 (KL,
    ≈ 0 in the first iteration, to 1e-5), and one process agrees with them to 2 % — far tighter than
    the factor of 2 that wrongly weighted rank losses would put into the gradient norm."""
    rl = ["rl", "--iterations", "1", "--batch-prompts", "8", "--samples", "2", "--minibatches", "1", "--epochs", "1"]
    runs = {}
    for nproc, mode in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        out = fresh_run(run_dir, tmp_path, f"{mode}{nproc}")
        torchrun(nproc, *rl, "--out", str(out), "--distributed", mode)
        (runs[nproc, mode],) = rows(out / "cagsr" / "metrics.jsonl")
        assert (out / "cagsr" / "rl.pt").exists()
    one, ddp, fsdp = runs[1, "ddp"], runs[2, "ddp"], runs[2, "fsdp"]
    for k in ("reward", "kl", "entropy", "grad_norm", "length"):
        assert fsdp[k] == pytest.approx(ddp[k], rel=1e-4, abs=1e-5), ("fsdp vs ddp", k)
        assert ddp[k] == pytest.approx(one[k], rel=2e-2, abs=1e-4), ("2 ranks vs 1 process", k)


@pytest.mark.slow
def test_bf16_rl_with_gradient_checkpointing_runs_and_starts_at_ratio_one(run_dir, tmp_path):
    """Ā stays a distribution under bf16 (the reward checks it), and the update's first ratio
    π_θ/π_old is 1 although sampling and the update run different bf16 kernels."""
    out = fresh_run(run_dir, tmp_path, "bf16")
    proc = run_cli("rl", "--out", str(out), "--iterations", "1", "--batch-prompts", "4", "--dtype", "bf16",
                   "--grad-checkpoint")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = rows(out / "cagsr" / "metrics.jsonl")
    assert row["first_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
