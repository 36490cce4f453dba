"""The RL loop of §5, top to bottom: draw prompts → sample N responses with Ā (rollout) → reward →
advantages → PPO update → log and checkpoint. The PPO pieces (collect_rollout, ppo_update and the
equations they use) are in ppo.py; the rewards in reward.py and baselines.py.

    train_rl   the loop: one RL iteration is one pass of its `for`
    run_rl     the stage: one run of one method into <run>/<name>/ (config.json, metrics.jsonl, rl.pt, rl_curves.png)
"""
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import runtime
from baselines import RewardModelConfig, reward_for_method
from data.user import records
from data.tokenizer import tokenizer_for
from plots import plot_rl
from ppo import ActorCritic, AdaptiveKL, PPOConfig, ValueHead, adam, collect_rollout, explained_variance, ppo_update
from reward import RewardConfig
from rundir import CLIError, Metrics, atomic_save, atomic_write, check_resume, load_checkpoint, load_model, \
    model_checkpoint
from sft import encode_prompts, pad

# The paper's lr 1e-5 is for a 1.3B model; a 4.6M model needs larger steps to move in a few dozen
# iterations. The SFT policy is nearly deterministic, so the N samples of a prompt differ in reward by
# ~0.003 while prompts differ by ~0.2: only the group baseline exposes that signal (a value head would
# have to be 1 % accurate first). See README, "Choosing the tiny RL settings".
RL_PRESETS = {"tiny": PPOConfig(iterations=40, lr=1e-4, kl_coef=0.01, baseline="group"),
              "small": PPOConfig(lr=3e-5, baseline="group")}


def train_rl(policy, reference, prompts, reward_fn, cfg: PPOConfig, last_layers: int, rdir: Path, seed=0,
             rt=None, size="tiny", quiet=False):
    """The RL loop: every iteration samples `batch_prompts` training prompts, collects a rollout and
    runs a PPO update; a resumable checkpoint (policy, value head, optimizer, RNG states, β_KL) every
    `checkpoint_every` iterations. A NaN or inf stops the run and leaves the last good checkpoint.
    In a distributed run (`rt`) each rank takes an equal share of the iteration's prompts and draws
    their sampling noise from the one global draw, rewards and advantage statistics are summed over
    the ranks, and only rank 0 writes. Returns the trained ActorCritic (policy + value head) and the
    metrics file."""
    rt = rt or runtime.setup()
    if cfg.batch_prompts % rt.world:
        raise CLIError(f"--batch-prompts {cfg.batch_prompts} does not split evenly over {rt.world} processes")
    torch.manual_seed(seed)
    rdir.mkdir(parents=True, exist_ok=True)
    value_head = ValueHead(policy.cfg.d_model)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    order = torch.Generator().manual_seed(seed)  # prompt draws and minibatch shuffles
    metrics, last, start = Metrics(rdir / "metrics.jsonl"), rdir / "rl-last.pt", 0
    ck = load_checkpoint(last) if last.exists() else None
    if ck:
        policy.load_state_dict(ck["model"]), value_head.load_state_dict(ck["value_head"])
    # FSDP: sampling runs the layers a token at a time outside the model's forward, so per-layer
    # shards would be all-gathered at every step; one group is gathered once per rollout instead
    # (the Adam states, the largest part, stay sharded; see memory_plan)
    model = rt.prepare(ActorCritic(policy, value_head), cfg.baseline != "value", shard_layers=False)
    reference.to(rt.device)
    policy, value_head = rt.unwrap(model).policy, rt.unwrap(model).value_head
    opt = adam(model.parameters(), cfg)
    if ck:
        rt.load_optimizer_state(model, opt, ck["optimizer"])
        order.set_state(ck["order"]), torch.set_rng_state(ck["rng"])
        kl_ctl.coef, start = ck["kl_coef"], ck["step"]
        if rt.main:
            print(f"rl: resuming from iteration {start} ({last})")
    if rt.main:
        metrics.truncate("rl", start)
    history = metrics.read("rl")

    def mean(x):  # over every rank's rows (each rank holds the same number)
        return x.float().mean().item() if rt.world == 1 else (rt.all_sum(x.float().mean()) / rt.world).item()

    bar = tqdm(total=cfg.iterations, initial=start, desc="rl", disable=quiet or not rt.main, dynamic_ncols=True)
    for it in range(start, cfg.iterations):
        idx = torch.randperm(len(prompts), generator=order)[: cfg.batch_prompts]
        noise = None
        if rt.distributed:  # this rank's prompts, and their rows of the global batch's sampling noise
            noise = torch.rand(len(idx), cfg.samples, cfg.max_new_tokens, generator=order)[rt.rank :: rt.world]
            idx, noise = idx[rt.rank :: rt.world], noise.reshape(-1, cfg.max_new_tokens).to(rt.device)
        src = pad([prompts[i] for i in idx], policy.cfg.pad_id).to(rt.device)
        with rt.gathered(model), rt.autocast():
            batch, terms, kl, times = collect_rollout(policy, value_head, reference, src, reward_fn, cfg,
                                                      kl_ctl.coef, last_layers, rt.all_sum, noise)
        if not torch.isfinite(rt.all_sum(batch.reward.sum())):
            raise CLIError(f"rl: the reward became NaN/inf at iteration {it + 1}; last good checkpoint: {last}")
        t0 = time.perf_counter()
        try:
            stats = ppo_update(model, opt, batch, cfg, order, rt)
        except FloatingPointError as e:
            raise CLIError(f"rl: {e} at iteration {it + 1}; last good checkpoint: {last}")
        kl_seq = mean(kl.sum(1))  # KL(π ‖ π_ref) per response, k1 estimate
        row = {"stage": "rl", "step": it + 1, "reward": mean(batch.reward),
               **{k: mean(v) for k, v in terms.items()}, "kl": kl_seq, "kl_coef": kl_ctl.coef,
               "length": mean(batch.mask.sum(1)),
               "explained_var": explained_variance(batch.v_old, batch.returns[:, 0]), **stats,
               **times, "t_update": time.perf_counter() - t0}
        kl_ctl.update(kl_seq, len(batch.reward) * rt.world)
        history.append(row)
        if rt.main:
            metrics.log(**row)
            warn_reward_hacking(history, bar)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            state = rt.model_state(model)
            head = {k.removeprefix("value_head."): v for k, v in state.items() if k.startswith("value_head.")}
            ck = {**model_checkpoint(policy, policy_state(state)), "optimizer": rt.optimizer_state(model, opt),
                  "value_head": head,
                  "order": order.get_state(), "rng": torch.get_rng_state(), "kl_coef": kl_ctl.coef, "step": it + 1}
            if rt.main:
                atomic_save(ck, last)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("reward", "coverage", "focus", "repeat", "kl", "length")
                         if k in row})
        bar.update()
    bar.close()
    return model, metrics


def policy_state(actor_critic_state: dict) -> dict:
    """The policy's weights out of an ActorCritic state dict."""
    return {k.removeprefix("policy."): v for k, v in actor_critic_state.items() if k.startswith("policy.")}


def warn_reward_hacking(history: list[dict], bar):
    """§6: say so when responses collapse in length or attention sits below the entropy floor for most
    steps — once when it starts, not at every iteration."""
    first = history[0]
    collapsed = [r["length"] < 0.5 * first["length"] for r in history[-2:]]
    spiky = [r.get("below_floor", 0) > 0.5 for r in history[-2:]]
    now = history[-1]
    if collapsed[-1] and (len(history) == 1 or not collapsed[0]):
        bar.write(f"warning: mean response length fell from {first['length']:.1f} to {now['length']:.1f} "
                  f"tokens at iteration {now['step']} — the policy may be gaming the reward (§6)")
    if spiky[-1] and (len(history) == 1 or not spiky[0]):
        bar.write(f"warning: attention entropy is below the floor on {now['below_floor']:.0%} of steps at "
                  f"iteration {now['step']} — spiky-attention reward hacking (§6)")


def run_rl(run: Path, size: str, method: str, rdir: Path, cfg: PPOConfig, rcfg: RewardConfig, data: Path, rt,
           seed=0, rmcfg=RewardModelConfig(), force=False, resume=False, start: Path | None = None) -> Path:
    """One RL run of `method` from `start` (default <run>/sft.pt; a Hugging Face checkpoint folder runs
    CAGSR straight from a pretrained model) into rdir: config.json, metrics.jsonl, rl_curves.png and
    rl.pt; a finished run is reused unless `force`."""
    final = rdir / "rl.pt"
    if final.exists() and not force:
        print(f"rl: reusing {final}")
        return final
    rdir.mkdir(parents=True, exist_ok=True)
    check_resume(rdir / "rl-last.pt", resume, force)
    tok = tokenizer_for(run)
    start = start or run / "sft.pt"
    policy, reference = (load_model(start, rt.device) for _ in range(2))
    reference.eval().requires_grad_(False)
    prompts = encode_prompts(tok, records("train", data), policy.cfg.max_len)
    if rt.main:
        atomic_write(rdir / "config.json", json.dumps({"method": method, "seed": seed, "start": str(start),
                                                       "data": str(data), "ppo": asdict(cfg),
                                                       "reward": asdict(rcfg)}, indent=2))
        print(f"rl: {method}, seed {seed}, {cfg.iterations} iterations of {cfg.batch_prompts} prompts × {cfg.samples}")
    reward_fn = reward_for_method(method, run, rcfg, rmcfg, data, rt, seed)
    model, metrics = train_rl(policy, reference, prompts, reward_fn, cfg, rcfg.last_layers, rdir, seed, rt, size)
    state = policy_state(rt.model_state(model))
    if rt.main:
        atomic_save(model_checkpoint(policy, state), final)
        plot_rl(metrics.read("rl"), rdir / "rl_curves.png")
        print(f"rl: wrote {final} and {rdir / 'rl_curves.png'}")
    rt.barrier()
    return final
