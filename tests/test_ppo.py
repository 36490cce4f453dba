"""ppo.py and the RL loop as a specification: worked numbers for advantages and the clipped loss,
ratio exactly 1 before the first update, no gradient into the reference or the reward, the loop
raises the CAGSR reward, and an interrupted run resumes to the same numbers."""
import copy
import json
import math
from dataclasses import replace

import pytest
import torch

import rl
import rundir
import sft
from conftest import interrupted_at_step
from model import PRESETS, Transformer
from ppo import (ActorCritic, AdaptiveKL, PPOConfig, ValueHead, advantages, collect_rollout, group_baseline, kl_per_token,
                 policy_loss, ppo_update, returns_to_go, value_loss)
from reward import AttentionReward, RewardConfig

CFG = replace(PRESETS["tiny"], vocab_size=40, d_model=32, n_heads=2, d_kv=16, d_ff=64, n_enc_layers=1, n_dec_layers=2,
              max_len=12)
WORDS = [a + b for a in "kmt" for b in "aeiouyxzqrst"]  # 36 lowercase words without digits
PIECES = ["<pad>", "</s>", "<unk>", "<x>"] + ["\u2581" + w for w in WORDS]
IDF = {w: float(i % 7) for i, w in enumerate(WORDS)}
PPO = PPOConfig(iterations=4, batch_prompts=8, samples=4, max_new_tokens=8, lr=1e-3, epochs=2, minibatches=2,
                checkpoint_every=2)


def prompts(n=8, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, CFG.vocab_size, (length,), generator=g).tolist() for _ in range(n)]


def fresh_policy(seed=0):
    torch.manual_seed(seed)
    return Transformer(CFG)


def reward_fn(**weights):
    return AttentionReward(IDF, PIECES, cfg=RewardConfig(**weights))


# ---- worked examples ---------------------------------------------------------------------------


def test_advantages_worked_example():
    """Two responses of one prompt; R = (1.0, 0.2), V_old(x) = 0.5, β_KL = 0.1, KL per token as below.
    G_t = R − 0.1·Σ_{t'≥t} KL_t';  A_t = G_t − V_old(x)."""
    reward = torch.tensor([1.0, 0.2])
    kl = torch.tensor([[0.2, 0.1, 0.3], [0.4, -0.2, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    g = returns_to_go(reward, kl, 0.1, mask)
    # response 1: tails 0.6, 0.4, 0.3 -> 1 − 0.06, 1 − 0.04, 1 − 0.03
    # response 2: tails 0.2, −0.2 (the padded KL does not count) -> 0.2 − 0.02, 0.2 + 0.02, 0
    torch.testing.assert_close(g, torch.tensor([[0.94, 0.96, 0.97], [0.18, 0.22, 0.0]]))
    a = advantages(g, torch.tensor([0.5, 0.5]), mask, whiten=False)
    torch.testing.assert_close(a, torch.tensor([[0.44, 0.46, 0.47], [-0.32, -0.28, 0.0]]))
    w = advantages(g, torch.tensor([0.5, 0.5]), mask, whiten=True)
    assert abs(w[mask].mean().item()) < 1e-6 and abs(w[mask].std(unbiased=False).item() - 1) < 1e-4
    assert torch.all(w[~mask] == 0)


def test_without_kl_the_advantage_is_the_papers_r_minus_v():
    reward, v_old = torch.tensor([0.3, -0.7, 1.2]), torch.tensor([0.1, 0.1, -0.4])
    mask = torch.ones(3, 4, dtype=torch.bool)
    a = advantages(returns_to_go(reward, torch.randn(3, 4), 0.0, mask), v_old, mask, whiten=False)
    torch.testing.assert_close(a, (reward - v_old)[:, None].expand(3, 4))


def test_group_baseline_is_the_mean_of_the_other_samples():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    torch.testing.assert_close(group_baseline(scores, 4), torch.tensor([11 / 3, 10 / 3, 3.0, 2.0,
                                                                        4 / 3, 4 / 3, 4 / 3, 0.0]))


def test_clipped_loss_worked_example():
    """ε = 0.2. Token by token, min(r·A, clip(r)·A):
    r=1.5, A=+1 -> min(1.5, 1.2) = 1.2      r=0.5, A=+1 -> min(0.5, 0.8) = 0.5
    r=1.5, A=−1 -> min(−1.5, −1.2) = −1.5   r=0.5, A=−1 -> min(−0.5, −0.8) = −0.8
    the fifth token is padding. Loss = −mean = −(1.2 + 0.5 − 1.5 − 0.8)/4 = 0.15."""
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 9.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, stats = policy_loss(ratio.log(), torch.zeros_like(ratio), adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.15)
    assert stats["clip_frac"] == 1.0 and stats["ratio_max"] == pytest.approx(1.5)
    # approx KL (k3) = mean((r − 1) − log r) over the 4 real tokens
    k3 = 2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))
    assert stats["approx_kl"] == pytest.approx(k3 / 4)


def test_value_loss_clipping():
    v, v_old, target = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0])
    assert value_loss(v, v_old, target, clip=0).item() == pytest.approx(0.5)  # ½(1 − 2)²
    assert value_loss(v, v_old, target, clip=0.2).item() == pytest.approx(0.5 * 1.8**2)  # V_clip = 0.2


def test_adaptive_kl_moves_towards_its_target():
    ctl = AdaptiveKL(0.1, target=1.0, horizon=100)
    ctl.update(kl=3.0, n_steps=10)
    assert ctl.coef == pytest.approx(0.1 * 1.02)
    ctl.update(kl=0.0, n_steps=10)
    assert ctl.coef < 0.1 * 1.02
    fixed = AdaptiveKL(0.1)
    fixed.update(kl=3.0, n_steps=10)
    assert fixed.coef == 0.1


def test_value_head_starts_at_zero():
    head = ValueHead(16)
    memory, mask = torch.randn(3, 5, 16), torch.ones(3, 1, 1, 5, dtype=torch.bool)
    assert torch.all(head(memory, mask) == 0)


# ---- the update on real rollouts ---------------------------------------------------------------


def rollout_batch(policy, reference, kl_coef=0.05, cfg=PPO):
    src = sft.pad(prompts(), CFG.pad_id)
    torch.manual_seed(1)
    return collect_rollout(policy, ValueHead(CFG.d_model), reference, src, reward_fn(), cfg, kl_coef, 1)


def test_ratio_is_one_and_nothing_clipped_on_the_first_minibatch():
    policy = fresh_policy()
    batch, _, _, _ = rollout_batch(policy, copy.deepcopy(policy))
    head = ValueHead(CFG.d_model)
    opt = torch.optim.Adam([*policy.parameters(), *head.parameters()], lr=1e-2)
    stats = ppo_update(ActorCritic(policy, head), opt, batch, PPO, torch.Generator().manual_seed(0))
    assert stats["first_ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert stats["first_ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["first_clip_frac"] == 0.0
    assert stats["ratio_max"] > 1.0 + 1e-3  # later minibatches see a moved policy


def test_kl_of_the_reference_to_itself_is_zero():
    policy = fresh_policy()
    batch, _, kl, _ = rollout_batch(policy, copy.deepcopy(policy))
    assert kl.abs().max() < 1e-5
    assert kl_per_token(batch.ref_logp, batch.ref_logp).abs().max() == 0


def test_no_gradient_reaches_the_reference_or_the_reward():
    policy, reference = fresh_policy(), fresh_policy()
    reference.requires_grad_(False)
    before = copy.deepcopy(reference.state_dict())
    batch, terms, _, _ = rollout_batch(policy, reference)
    for t in (batch.reward, batch.ref_logp, batch.old_logp, batch.adv, batch.returns, *terms.values()):
        assert not t.requires_grad
    head = ValueHead(CFG.d_model)
    opt = torch.optim.Adam([*policy.parameters(), *head.parameters()], lr=1e-2)
    ppo_update(ActorCritic(policy, head), opt, batch, PPO, torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in reference.parameters())
    for k, v in reference.state_dict().items():
        assert torch.equal(v, before[k])


def run_rl(tmp_path, cfg=PPO, weights=None, seed=0, policy=None):
    policy = policy or fresh_policy(seed)
    reference = copy.deepcopy(policy).requires_grad_(False)
    rl.train_rl(policy, reference, prompts(), reward_fn(**(weights or {})), cfg, 1, tmp_path, seed=seed,
                   quiet=True)
    return rundir.Metrics(tmp_path / "metrics.jsonl").read("rl")


@pytest.mark.learning
def test_a_short_run_raises_the_cagsr_reward(tmp_path, seed, record_property):
    """A policy that starts out stuttering earns a large repetition penalty: every state carries a large
    constant component the head reads as logit ≈ 2.5 for token 10, and token 10's own embedding a second
    one that adds ≈ 5 more at the next step (the others' logits are ≈ 0). Ten PPO iterations with the
    paper's α, β, γ on 8 fixed prompts must remove most of it and raise the mean reward by far more than
    its noise. Seeds 0–7: first repeat penalty 0.13–0.57, gain 0.15–0.60 (0.40–0.60 for seeds 0–4), last
    repeat ≤ 0.005."""
    policy = fresh_policy(seed)
    with torch.no_grad():
        policy.embed.weight[:, 0] += 20.0  # the normed states' component 0 is then ≈ 4.9, ≈ 3.9 after token 10
        policy.embed.weight[10, 1] += 20.0
        policy.lm_head.weight.mul_(0.1)
        policy.lm_head.weight[10, :2] = torch.tensor([0.5, 1.3])
    rows = run_rl(tmp_path, replace(PPO, iterations=10, kl_coef=0.0, checkpoint_every=100), seed=seed, policy=policy)
    first, last = rows[0], rows[-1]
    record_property("reward_gain", last["reward"] - first["reward"])
    record_property("repeat_last_over_first", last["repeat"] / first["repeat"])
    assert last["reward"] > first["reward"] + 0.1, (first["reward"], last["reward"])
    assert last["repeat"] < first["repeat"] / 4


def test_interrupted_rl_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    whole = run_rl(tmp_path / "whole")
    with interrupted_at_step(monkeypatch, 3):
        run_rl(tmp_path / "cut")
    resumed = run_rl(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        for k in ("reward", "kl", "policy_loss", "value_loss", "length"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_nan_reward_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    run_rl(tmp_path, replace(PPO, iterations=2))
    good = (tmp_path / "rl-last.pt").read_bytes()

    def nan_reward(rollout, src):
        return torch.full((rollout.tokens.shape[0],), float("nan")), {}

    policy = fresh_policy()
    with pytest.raises(rundir.CLIError, match="NaN"):
        rl.train_rl(policy, copy.deepcopy(policy), prompts(), nan_reward, replace(PPO, iterations=4), 1,
                       tmp_path, quiet=True)
    assert (tmp_path / "rl-last.pt").read_bytes() == good


def test_metrics_carry_every_statistic_the_readme_explains(tmp_path):
    row = run_rl(tmp_path, replace(PPO, iterations=1))[0]
    for k in ("reward", "coverage", "focus", "repeat", "kl", "kl_coef", "approx_kl", "clip_frac", "ratio_mean",
              "ratio_min", "ratio_max", "policy_loss", "value_loss", "explained_var", "entropy", "length",
              "t_sample", "t_reward", "t_reference", "t_update"):
        assert k in row and math.isfinite(row[k]), k
    json.dumps(row)
