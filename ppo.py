"""PPO for CAGSR (paper §4, §5, §7.2): value head, advantages, clipped surrogate, KL to the reference.

The two halves of an RL iteration (the loop around them — drawing prompts, the KL controller, logging,
checkpoints — is rl.train_rl):

    collect_rollout   sample N responses per prompt; reward R from the *sampling* pass's Ā; log-probs of
                      the frozen SFT reference; V_old(x) — all without gradient
    advantages        A_t = R − β_KL·Σ_{t'≥t} KL_t' − V_old(x)   (§4 plus the per-token KL penalty)
    ppo_update        epochs × minibatches of the clipped surrogate, value loss and entropy bonus, Adam

Details the paper leaves out follow the public PPO-for-language-models recipes (Ziegler et al. 2019,
Stiennon et al. 2020, Huang et al. 2024 "The N+ implementation details of RLHF with PPO"): the KL
penalty enters the reward per token with the k1 estimator log π_old − log π_ref; advantages are whitened;
the value loss is clipped around V_old; a fresh shuffle for every epoch.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import decoder_input
from runtime import Runtime

# ---- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOConfig:
    iterations: int = 100  # RL iterations (one rollout and one PPO update each)
    checkpoint_every: int = 10  # iterations between resumable checkpoints
    batch_prompts: int = 64  # prompts per iteration (§7.2)
    samples: int = 4  # N responses per prompt (§7.2)
    max_new_tokens: int = 48  # longest sampled response, in tokens
    temperature: float = 1.0  # sampling and log-prob recomputation use the same one
    lr: float = 1e-5  # Adam learning rate (§7.2; the tiny preset overrides it)
    clip_eps: float = 0.2  # ε of the clipped surrogate (§4, §7.2)
    value_clip: float = 0.2  # V may move at most this far from V_old per update; 0 = unclipped
    vf_coef: float = 0.5  # weight of the value loss (baseline "value" only)
    ent_coef: float = 0.0  # entropy bonus
    kl_coef: float = 0.05  # β_KL of the per-token KL penalty to the SFT reference
    kl_target: float = 0.0  # > 0: adapt β_KL towards this KL per sequence (Ziegler et al. 2019)
    kl_horizon: int = 10_000  # horizon of the adaptive β_KL, in responses (Ziegler et al. 2019)
    baseline: str = "value"  # "value": V_old(x) as in §4; "group": mean of the other N−1 samples
    whiten: bool = True  # whiten the advantages to mean 0, std 1
    epochs: int = 2  # PPO epochs per iteration
    minibatches: int = 4  # PPO minibatches per epoch
    grad_clip: float = 1.0  # clip the gradient norm to this


# ---- value head (§7.2: "shares the underlying layers ... a small feed-forward head") -------------


class ValueHead(nn.Module):
    """V(x): masked mean of the policy's encoder states, then a two-layer MLP to a scalar.
    The last layer starts at zero, so V ≡ 0 before training and early advantages are just R."""

    def __init__(self, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, memory, src_mask):  # memory [B,S,D], src_mask [B,1,1,S] -> [B]
        m = src_mask[:, 0, 0, :, None].to(memory.dtype)  # [B,S,1]
        pooled = (memory * m).sum(dim=1) / m.sum(dim=1)  # [B,D]
        return self.mlp(pooled.float())[:, 0]


class ActorCritic(nn.Module):
    """The policy and its value head as one module, so that the PPO update is one forward pass — the
    module that DDP or FSDP wraps in a distributed run."""

    def __init__(self, policy, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, src, dec_in, mask, train_value=True):
        """src [B,S], dec_in [B·N,T], mask [B·N,T] -> logits [n,V] of the n real positions (a packed
        pass, model.Packing), V(x) [B]."""
        memory, src_mask = self.policy.encode(src, packed=True)
        logits, _ = self.policy.decode(memory, src_mask, dec_in, tgt_mask=mask)
        with torch.set_grad_enabled(train_value and torch.is_grad_enabled()):  # V without gradient: DDP
            return logits, self.value_head(memory, src_mask)  # then sees the head as unused, as it is


# ---- per-token quantities ----------------------------------------------------------------------


def masked_mean(x, mask, all_sum=None):
    """Mean of x over the real tokens; with all_sum (runtime.Runtime.all_sum), over every rank's."""
    if all_sum is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return all_sum((x * mask).sum()) / all_sum(mask.sum()).clamp(min=1)


def token_logprobs(logits, tokens, temperature=1.0):
    """log π(y_t) and the entropy of π at every step, under softmax(logits / temperature).
    logits [B,T,V], tokens [B,T] -> both [B,T]."""
    logp = (logits.float() / temperature).log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp.gather(-1, tokens[..., None])[..., 0], entropy


def response_logprobs(logits, tokens, mask, temperature=1.0):
    """token_logprobs of a packed pass — logits [n,V] at the real positions of mask [B,T] — laid back
    out as [B,T] each, 0 at the padding."""
    logp, entropy = token_logprobs(logits, tokens[mask], temperature)
    return tuple(torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)
                 for x in (logp, entropy))


def kl_per_token(logp, ref_logp):
    """k1 estimator of KL(π_old ‖ π_ref) at each sampled token: log π_old(y_t) − log π_ref(y_t).
    Its expectation under π_old is the exact KL; single samples may be negative."""
    return logp - ref_logp


def returns_to_go(reward, kl, kl_coef, mask):
    """Return from step t of a response: G_t = R − β_KL · Σ_{t'≥t} KL_t' (no discount).
    The sequence reward R [B] arrives at the end; the KL penalty is paid per token. -> [B,T]."""
    kl = kl * mask
    tail = kl.flip(1).cumsum(1).flip(1)  # Σ_{t'≥t} KL_t'
    return (reward[:, None] - kl_coef * tail) * mask


def group_baseline(scores, n):
    """Leave-one-out mean over the N samples of the same prompt: b_i = (Σ_j s_j − s_i)/(N−1). [B·N]"""
    groups = scores.view(-1, n)
    return ((groups.sum(1, keepdim=True) - groups) / (n - 1)).reshape(-1)


def advantages(returns, baseline, mask, whiten=True, all_sum=None):
    """A_t = G_t − b(x) (§4: A ≈ R − V_old(x)); whitened to mean 0, std 1 over the real tokens (of
    every rank, given all_sum)."""
    adv = (returns - baseline[:, None]) * mask
    if whiten:
        mean = masked_mean(adv, mask, all_sum)
        std = masked_mean((adv - mean) ** 2, mask, all_sum).sqrt()
        adv = (adv - mean) / (std + 1e-8) * mask
    return adv


def policy_loss(logp, old_logp, adv, mask, clip_eps):
    """Clipped surrogate of §4: L = −E_t[min(r_t A_t, clip(r_t, 1−ε, 1+ε) A_t)], r_t = π_θ/π_old.
    Returns the loss and its statistics (ratio, clip fraction, approx KL old→new)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    with torch.no_grad():
        real = ratio[mask]
        stats = {"ratio_mean": real.mean().item(), "ratio_min": real.min().item(), "ratio_max": real.max().item(),
                 "clip_frac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item(),
                 # k3 estimator (Schulman 2020): (r − 1) − log r ≥ 0, unbiased for KL(π_old ‖ π_θ)
                 "approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item()}
    return -masked_mean(surrogate, mask), stats


def value_loss(v, v_old, target, clip):
    """½ max((V − G)², (V_clip − G)²) with V_clip = V_old + clip(V − V_old, ±clip); clip 0 = plain MSE."""
    loss = (v - target) ** 2
    if clip > 0:
        v_clipped = v_old + (v - v_old).clamp(-clip, clip)
        loss = torch.max(loss, (v_clipped - target) ** 2)
    return 0.5 * loss.mean()


def explained_variance(pred, target):
    """1 − Var(target − pred)/Var(target): 1 = perfect value function, ≤ 0 = no better than a constant."""
    var = target.var()
    return float("nan") if var == 0 else (1 - (target - pred).var() / var).item()


class AdaptiveKL:
    """β_KL ← β_KL·(1 + clip(KL/target − 1, ±0.2)·n/horizon) (Ziegler et al. 2019); fixed when target is 0."""

    def __init__(self, coef, target=0.0, horizon=10_000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl, n_steps):
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * n_steps / self.horizon


# ---- one iteration -----------------------------------------------------------------------------


def adam(params, cfg: PPOConfig):
    """The PPO optimizer: Adam, fused — one kernel for all parameters instead of a loop of per-tensor
    operations, which was a seventh of the tiny preset's update (same update up to float rounding)."""
    return torch.optim.Adam(params, lr=cfg.lr, fused=True)



@dataclass
class Batch:
    """Everything an update needs, gathered without gradient. B prompts, N samples each."""
    src: torch.Tensor  # [B,S] prompts
    tokens: torch.Tensor  # [B·N,T] sampled responses (EOS included, pad after)
    mask: torch.Tensor  # [B·N,T]
    old_logp: torch.Tensor  # [B·N,T] log π_old(y_t) from the sampling pass
    ref_logp: torch.Tensor  # [B·N,T] log π_ref(y_t) of the frozen SFT model
    v_old: torch.Tensor  # [B·N] V_old(x), repeated over the N samples
    reward: torch.Tensor  # [B·N] R(x, y)
    returns: torch.Tensor  # [B·N,T] G_t
    adv: torch.Tensor  # [B·N,T] A_t




@torch.no_grad()
def collect_rollout(policy, value_head, reference, src, reward_fn, cfg: PPOConfig, kl_coef: float,
                    capture_last: int, all_sum=None, uniforms=None):
    """Sample, score and prepare one batch. reward_fn(rollout, src) -> (R [B·N], {term: [B·N]}).
    Returns the Batch, the reward terms, the per-token KL [B·N,T] and the seconds each part took.
    In a distributed run (this rank's prompts in src): all_sum whitens the advantages over every rank's
    tokens, and `uniforms` are this rank's rows of the sampling noise (model.Transformer.generate)."""
    policy.eval()
    n, t0 = cfg.samples, time.perf_counter()
    r = policy.generate(src, num_samples=n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        capture_last=capture_last, uniforms=uniforms)
    t1 = time.perf_counter()
    reward, terms = reward_fn(r, src)  # from the sampling pass's Ā
    t2 = time.perf_counter()
    dec_in = decoder_input(r.tokens, policy.cfg.pad_id)
    ref_logp = response_logprobs(reference(src, dec_in, tgt_mask=r.mask)[0], r.tokens, r.mask, cfg.temperature)[0]
    times = {"t_sample": t1 - t0, "t_reward": t2 - t1, "t_reference": time.perf_counter() - t2}
    v_old = value_head(r.memory, r.src_mask).repeat_interleave(n)  # [B·N], from the sampling pass's encoder
    kl = kl_per_token(r.logprobs, ref_logp) * r.mask
    returns = returns_to_go(reward, kl, kl_coef, r.mask)
    baseline = v_old if cfg.baseline == "value" else group_baseline(returns[:, 0], n)
    adv = advantages(returns, baseline, r.mask, cfg.whiten, all_sum)
    return Batch(src, r.tokens, r.mask, r.logprobs, ref_logp, v_old, reward, returns, adv), terms, kl, times


def ppo_update(model: ActorCritic, opt, batch: Batch, cfg: PPOConfig, gen: torch.Generator, rt=None) -> dict:
    """cfg.epochs passes over the batch in cfg.minibatches minibatches of whole prompt groups (the N
    samples of a prompt stay together so the encoder runs once per prompt). `model` may be wrapped in
    DDP/FSDP by `rt` (runtime.Runtime: autocast, sums over ranks). Returns mean statistics;
    `first_*` are the statistics of the very first minibatch, where the ratio must be 1."""
    rt = rt or Runtime(torch.device("cpu"))
    model.train()
    n, B = cfg.samples, batch.src.shape[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    start_id = Runtime.unwrap(model).policy.cfg.pad_id
    logs = []
    for _ in range(cfg.epochs):
        for prompts in torch.randperm(B, generator=gen).chunk(cfg.minibatches):
            rows = (prompts[:, None] * n + torch.arange(n)).reshape(-1)  # the N rows of each prompt
            mask, tokens = batch.mask[rows], batch.tokens[rows]
            # each rank holds part of the minibatch (the same number of prompts): weighting its token
            # means by its share of the tokens makes DDP's average of the ranks' gradients the gradient
            # of the mean over all tokens — the single-process update (share = 1 in one process)
            local = mask.sum()
            share = rt.world * local / rt.all_sum(local)
            with rt.autocast():
                logits, v = model(batch.src[prompts], decoder_input(tokens, start_id), mask, cfg.baseline == "value")
                logp, entropy = response_logprobs(logits, tokens, mask, cfg.temperature)
                pg_loss, stats = policy_loss(logp, batch.old_logp[rows], batch.adv[rows], mask, cfg.clip_eps)
                v_loss = value_loss(v.float().repeat_interleave(n), batch.v_old[rows], batch.returns[rows, 0],
                                    cfg.value_clip)
                ent = masked_mean(entropy, mask)
                loss = (pg_loss - cfg.ent_coef * ent) * share
                if cfg.baseline == "value":  # the group baseline leaves V unused: don't let it pull the encoder
                    loss = loss + cfg.vf_coef * v_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"PPO loss became {loss.item()}")
            opt.step()
            logs.append({**rt.reduce_stats({**stats, "policy_loss": pg_loss.item(), "entropy": ent.item()},
                                       (share / rt.world).item()),
                         **rt.reduce_stats({"value_loss": v_loss.item(), "grad_norm": grad_norm.item()}, 1 / rt.world)})
    out = {k: sum(d[k] for d in logs) / len(logs) for k in logs[0]}
    out["ratio_min"], out["ratio_max"] = min(d["ratio_min"] for d in logs), max(d["ratio_max"] for d in logs)
    out.update({f"first_{k}": logs[0][k] for k in ("ratio_mean", "ratio_min", "ratio_max", "clip_frac")})
    return out
