"""CAGSR from the command line: prepare → supervised fine-tuning → reinforcement → evaluation.

    python cagsr.py --size tiny          # the whole pipeline; a rerun reuses finished stages
    python cagsr.py sft --size tiny      # one stage; `python cagsr.py SUBCOMMAND --help` for its flags

Every output goes to runs/<size>/ (or --out DIR): config.json, metrics.jsonl, checkpoints, PNG plots.
This file is the command line only: each stage lives in its own module (sft.py, rl.py, table1.py), and
the flags of their settings are made from the configuration dataclasses (SFTConfig, PPOConfig,
RewardConfig, RewardModelConfig), so a flag's default and help are the field's.
"""
import argparse
import dataclasses
import inspect
import json
import re
import sys
import time
import typing
from pathlib import Path

import torch

import evaluate
import hf
import runtime
from baselines import METHODS, RewardModelConfig
from data import SPLITS, DataError, format_stats, length_stats
from data.hard import default_data, default_run
from data.user import is_user_data, records
from data.tokenizer import Tokenizer, tokenizer_for, train_tokenizer, training_texts
from model import PRESETS, ModelConfig
from plots import plot_attention
from ppo import PPOConfig
from reward import RewardConfig, fit_idf, reward_for, save_idf
from rl import RL_PRESETS, run_rl
from rundir import CLIError, Metrics, atomic_write, export_hf, load_model, record_data, record_init
from runtime import GPUS, memory_plan
from sft import SFT_PRESETS, SFTConfig, check_lengths, run_sft
from diagnose import run_diagnostic
from table1 import BUDGET, check_methods, run_table1

# ---- settings: the configuration dataclasses, overridden by the flags that were given ------------


def overrides(cfg, args):
    """cfg with every field that was given on the command line replaced."""
    given = {k: v for k, v in vars(args).items() if k in cfg.__dataclass_fields__ and v is not None}
    return dataclasses.replace(cfg, **given)


def sft_config(args) -> SFTConfig:
    # the SFT flags belong to the `sft` subcommand; in the pipeline, --lr is RL's
    return overrides(SFT_PRESETS[args.size], args) if args.command == "sft" else SFT_PRESETS[args.size]


def ppo_config(args, **budget) -> PPOConfig:
    """The size's RL preset, with `budget` (a stage's own defaults, e.g. table1.BUDGET), then the flags."""
    return overrides(dataclasses.replace(RL_PRESETS.get(args.size, PPOConfig()), **budget), args)


def reward_configs(args) -> tuple[RewardConfig, RewardModelConfig]:
    return overrides(RewardConfig(), args), overrides(RewardModelConfig(), args)


# ---- the small commands ----------------------------------------------------------------------------


def prepare(args) -> Path:
    """Load and check the data, take the tokenizer of --init's checkpoint or train one on the training
    split, fit I_x's IDF on the training prompts, print length statistics. Reuses what exists. Bad data
    (a bad record, or one longer than the model takes) is found before the tokenizer is kept."""
    run, path = args.run, args.run / "tokenizer.model"
    splits = {s: records(s, args.data) for s in SPLITS}
    if args.init:  # the checkpoint's own tokenizer and length limit; checked before anything is written
        max_len = hf.read_config(args.init)["max_len"]  # first: is it a T5-family checkpoint at all?
        check_lengths(Tokenizer(hf.tokenizer_file(args.init)), splits, max_len)
    run.mkdir(parents=True, exist_ok=True)
    record_init(run, args.init)
    record_data(run, args.data)
    if not path.exists():
        trial = path.with_name("tokenizer.trial.model")
        try:
            check_lengths(train_tokenizer(training_texts(args.data), PRESETS[args.size].vocab_size, trial), splits,
                          PRESETS[args.size].max_len)
            trial.replace(path)
        finally:
            trial.unlink(missing_ok=True)
    tok = tokenizer_for(run)
    print(f"tokenizer: {tok.vocab_size} pieces, " + (f"from {args.init}" if args.init else "trained on the training split")
          + f" -> {path}")
    if not (run / "idf.json").exists():  # I_x of §3.2 needs word IDFs over the training prompts
        save_idf(fit_idf([r["prompt"] for r in splits["train"]]), run / "idf.json")
    print(format_stats(length_stats([r for s in splits.values() for r in s], tok)))
    return path


def prepared(args) -> None:
    """prepare, unless the run directory is prepared already (then only check --init and --data against it)."""
    if (args.run / "idf.json").exists():
        record_init(args.run, args.init)
        record_data(args.run, args.data)
    else:
        prepare(args)


def sft(args) -> Path:
    prepared(args)
    return run_sft(args.run, args.size, sft_config(args), args.data, args.rt, args.seed, args.force, args.resume)


def rl(args) -> Path:
    """RL from <run>/sft.pt, or with `rl --init DIR` straight from the pretrained checkpoint."""
    rcfg, rmcfg = reward_configs(args)
    start = args.init if args.command == "rl" and args.init else None
    prepared(args)
    return run_rl(args.run, args.size, args.method, args.run / (getattr(args, "name", None) or args.method),
                  ppo_config(args), rcfg, args.data, args.rt, args.seed, rmcfg, args.force, args.resume, start)


def export_cmd(args):
    """A checkpoint of ours as a Hugging Face T5 folder, with the run's tokenizer as spiece.model."""
    path = export_hf(load_model(args.checkpoint), args.hf, args.run / "tokenizer.model")
    print(f"export: wrote {path}/ (config.json, model.safetensors, spiece.model); "
          f"load it with T5ForConditionalGeneration.from_pretrained({str(path)!r})")


def table1(args):
    """Table 1 and the ablations: prepare and SFT if needed, then every method × seed (table1.py)."""
    methods = args.methods.split(",") if args.methods else list(METHODS)
    check_methods(methods)  # before prepare and SFT, which take minutes
    if is_user_data(args.data):
        raise CLIError("table1 scores answers against the synthetic data sets' facts; run it without --data")
    if not args.report_only:
        args.resume = True
        sft(args)
    rcfg, rmcfg = reward_configs(args)
    run_table1(args.run, args.size, methods, args.seeds, ppo_config(args, **BUDGET), rcfg, rmcfg, args.data, args.rt,
               args.seed, args.eval_prompts, args.report_only, args.force, args.diagnose_prompts, args.results)


def diagnose_cmd(args) -> dict:
    """The reward diagnostic of diagnose.py on the SFT model (or --checkpoint), before any RL."""
    if is_user_data(args.data):
        raise CLIError("diagnose compares rewards with the synthetic data sets' oracle; run it without --data")
    args.resume = True
    sft(args)
    (rcfg, rmcfg), cfg = reward_configs(args), ppo_config(args)
    return run_diagnostic(args.run, args.checkpoint or args.run / "sft.pt", rcfg, rmcfg, args.data, args.rt,
                          args.prompts, cfg.samples, cfg.temperature, not args.no_reward_models, args.seed)


def eval_cmd(args) -> dict:
    tok, model = tokenizer_for(args.run), load_model(args.checkpoint or args.run / "sft.pt", args.device)
    rcfg, _ = reward_configs(args)
    result = evaluate.evaluate_policy(model, tok, reward_for(args.run, tok, rcfg), rcfg.last_layers, args.data,
                                      args.device)
    atomic_write(args.run / "eval.json", json.dumps(result, indent=2))
    print(" | ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def sample_cmd(args):
    """Answer one prompt, print it, and draw its cross-attention heat map."""
    tok, model = tokenizer_for(args.run), load_model(args.checkpoint or args.run / "sft.pt", args.device)
    ids = tok.encode(args.prompt)
    if len(ids) > model.cfg.max_len:
        raise CLIError(f"prompt has {len(ids)} tokens; the {args.size} model reads at most {model.cfg.max_len}")
    model.eval()
    last = reward_configs(args)[0].last_layers
    r = model.generate(torch.tensor([ids], device=args.device), greedy=args.temperature == 0,
                       temperature=args.temperature or 1.0, capture_last=last)
    n = int(r.mask[0].sum())
    print(tok.decode(r.tokens[0].tolist()))
    path = args.run / "attention.png"
    plot_attention(r.cross_attn[0, :n].cpu(), [tok.pieces[i] for i in ids],
                   [tok.pieces[i] for i in r.tokens[0, :n].tolist()], path,
                   f"cross-attention, last {last} layer(s), heads averaged")
    print(f"heat map: {path}")


def plan_cmd(args):
    """Memory needed to train a preset, an --init checkpoint or a --published one with RL
    (runtime.memory_plan), and which GPUs it fits."""
    gpus, cfg = args.gpus if args.distributed else 1, ppo_config(args)
    name, model = args.size, PRESETS[args.size]
    if args.init or args.published:
        name = args.published or str(args.init)
        model = ModelConfig(**(hf.read_config(args.init) if args.init
                               else {**hf.PUBLISHED[args.published], "max_len": hf.PRETRAINED_MAX_LEN}))
    p = memory_plan(model, args.dtype, cfg.batch_prompts, cfg.samples, cfg.minibatches, args.grad_checkpoint,
                    gpus, args.distributed)
    where = f"each of {gpus} processes ({args.distributed})" if args.distributed else "one RL process"
    print(f"{name}: {p['parameters'] / 1e6:,.1f}M parameters; {where}, {args.dtype}, "
          f"{cfg.batch_prompts} prompts × {cfg.samples} samples, {cfg.minibatches} minibatches"
          f"{', gradient checkpointing' if args.grad_checkpoint else ''} (estimates, GiB)")
    for k in ("weights", "gradients", "adam", "reference", "activations", "total"):
        print(f"  {k:12} {p[k]:8.2f}")
    print("  fits on: " + (", ".join(g for g, mem in GPUS.items() if p["total"] < 0.9 * mem) or "none of "
                           + ", ".join(GPUS) + " — shard with FSDP or checkpoint activations"))


def pipeline(args):
    """The default job: every stage in order, each reused when its output already exists."""
    t0 = time.time()
    args.resume = True  # a rerun of the pipeline continues whatever was interrupted
    prepare(args)
    sft(args)
    tok, sft_model = tokenizer_for(args.run), load_model(args.run / "sft.pt", args.device)
    qa = records("test", args.data)[:5]
    for r, answer in zip(qa, evaluate.answers(sft_model, tok, [r["prompt"] for r in qa], device=args.device)):
        print(f"\n  prompt:    {r['prompt']}\n  model:     {answer}\n  reference: {r['response']}")
    rl(args)
    rows = Metrics(args.run / args.method / "metrics.jsonl").read("rl")
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (rows[:5], rows[-5:]))
    print(f"\nRL training batches: reward {first:.4f} (first 5 iterations) -> {last:.4f} (last 5); "
          f"KL to SFT {rows[-1]['kl']:.2f} nats per response")
    rcfg, _ = reward_configs(args)
    reward_fn, results = reward_for(args.run, tok, rcfg), {}
    for name, path in (("sft (No-RL)", args.run / "sft.pt"), (f"rl ({args.method})", args.run / args.method / "rl.pt")):
        model = load_model(path, args.device)
        results[name] = evaluate.evaluate_policy(model, tok, reward_fn, rcfg.last_layers, args.data, args.device)
    atomic_write(args.run / "eval.json", json.dumps(results, indent=2))
    names = list(results)
    print(f"\nTest split, greedy answers{'':14}" + "".join(f"{n:>16}" for n in names))
    for k in results[names[0]]:
        print(f"  {k:38}" + "".join(f"{results[n][k]:16.4f}" for n in names))
    print(f"done in {time.time() - t0:.0f} s; outputs in {args.run}/")


# ---- command line ----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def field_help(cls) -> dict[str, str]:
    """Each field's help text: the comment at the end of its line in the dataclass."""
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))


def add_config_flags(parser: argparse.ArgumentParser, cls, preset=None):
    """One flag per field of the dataclass `cls`: --field-name, of the field's type, with the comment of
    its line as help. A flag not given leaves the field to the preset (`preset` is what --size tiny
    uses, printed in the help when it differs from the field's default)."""
    helps, types = field_help(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f"default {f.default}"
        if preset is not None and getattr(preset, f.name) != f.default:
            default += f"; --size tiny: {getattr(preset, f.name)}"
        kind = {"action": argparse.BooleanOptionalAction} if types[f.name] is bool else {"type": types[f.name]}
        parser.add_argument("--" + f.name.replace("_", "-"), **kind, help=f"{helps[f.name]} ({default})")


def parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--size", choices=list(PRESETS), default="tiny", help="model preset (default tiny)")
    common.add_argument("--out", type=Path, help="run directory (default runs/<size>, runs/<size>-hard for data/hard)")
    common.add_argument("--seed", type=int, default=0, help="seed of the stage's training (default 0)")
    common.add_argument("--data", type=Path,
                        help="data: a synthetic regime's folder (default data/, the easy sets; data/hard is table1's "
                             "default), or your own FILE.jsonl or folder "
                             "of train/validation/test.jsonl with {\"prompt\": ..., \"response\": ...} per line")
    common.add_argument("--init", type=Path, help="start from this Hugging Face T5-family checkpoint folder "
                                                  "(config.json, weights, spiece.model) instead of a fresh preset")
    common.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    common.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast the forward passes, keep fp32 master weights (default fp32)")
    common.add_argument("--compile", action="store_true", help="torch.compile the training forward passes")
    common.add_argument("--grad-checkpoint", action="store_true",
                        help="recompute activations in the backward pass (less memory, ≈⅓ more compute)")
    common.add_argument("--distributed", choices=["ddp", "fsdp"],
                        help="sft/rl under torchrun: DistributedDataParallel or fully sharded (FSDP)")
    common.add_argument("--force", action="store_true", help="redo a stage even if its output exists")
    common.add_argument("--resume", action="store_true", help="continue an interrupted stage from its checkpoint")
    common.add_argument("--method", choices=METHODS[1:], default="cagsr", help="RL reward (default cagsr)")
    add_config_flags(common, RewardConfig)
    rl_flags = Parser(add_help=False)
    add_config_flags(rl_flags, PPOConfig, RL_PRESETS["tiny"])
    add_config_flags(rl_flags, RewardModelConfig)
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               parents=[common, rl_flags])
    sub = p.add_subparsers(dest="command")
    sub.add_parser("prepare", parents=[common], help="check the data, train the tokenizer, print length stats")
    s = sub.add_parser("sft", parents=[common], help="supervised fine-tuning: the No-RL baseline")
    add_config_flags(s, SFTConfig, SFT_PRESETS["tiny"])
    e = sub.add_parser("eval", parents=[common], help="exact-fact accuracy and perplexity on the test split")
    e.add_argument("--checkpoint", type=Path, help="model to score (default <run>/sft.pt)")
    s = sub.add_parser("sample", parents=[common], help="answer one prompt and draw its attention heat map")
    s.add_argument("--prompt", required=True)
    s.add_argument("--checkpoint", type=Path, help="model to use (default <run>/sft.pt)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r = sub.add_parser("rl", parents=[common, rl_flags], help="PPO from the SFT checkpoint on the chosen reward")
    r.add_argument("--name", help="output folder under the run directory (default: the method)")
    t = sub.add_parser("table1", parents=[common, rl_flags], help="Table 1 and ablations: every method, several seeds")
    t.add_argument("--seeds", type=int, default=3, help="RL seeds per method (default 3)")
    t.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    t.add_argument("--eval-prompts", type=int, default=300, help="test prompts scored per data set (300, as §7.4)")
    t.add_argument("--report-only", action="store_true", help="only assemble the finished runs' scores")
    t.add_argument("--results", type=Path, help="also copy results.*, run.json and diagnose.* into this folder "
                                                "(the repository's results/ holds the final run's)")
    t.add_argument("--diagnose-prompts", type=int, default=100,
                   help="validation prompts per data set of the reward diagnostic before RL (default 100; 0 skips it)")
    g = sub.add_parser("diagnose", parents=[common, rl_flags],
                       help="before RL: does each reward order sampled answers as the oracle and the judge do?")
    g.add_argument("--checkpoint", type=Path, help="policy to sample from (default <run>/sft.pt)")
    g.add_argument("--prompts", type=int, default=100, help="validation prompts per data set (default 100)")
    g.add_argument("--no-reward-models", action="store_true", help="skip the learned reward models and the hybrid")
    x = sub.add_parser("export", parents=[common], help="write a checkpoint as a Hugging Face T5 folder")
    x.add_argument("--checkpoint", type=Path, required=True, help="our checkpoint, e.g. runs/tiny/cagsr/rl.pt")
    x.add_argument("--hf", type=Path, required=True, help="folder to write (config.json, model.safetensors, spiece.model)")
    pl = sub.add_parser("plan", parents=[common, rl_flags], help="memory needed to train a preset, and which GPUs fit")
    pl.add_argument("--gpus", type=int, default=8, help="processes of a --distributed plan (default 8)")
    pl.add_argument("--published", choices=list(hf.PUBLISHED), help="plan for a published checkpoint, by name")
    return p


COMMANDS = {None: pipeline, "prepare": prepare, "sft": sft, "rl": rl, "eval": eval_cmd, "sample": sample_cmd,
            "table1": table1, "diagnose": diagnose_cmd, "export": export_cmd}


def main(argv=None):
    args = parser().parse_args(argv)
    args.data = args.data or default_data(args.command)
    args.run = args.out or default_run(args.size, args.data)
    try:
        if args.command == "plan":  # a plan needs no device and starts no process group
            return plan_cmd(args)
        if args.distributed and args.command not in ("sft", "rl"):
            raise CLIError("--distributed works with the sft and rl subcommands (run prepare first, in one process)")
        args.rt = runtime.setup(args.device, args.dtype, args.compile, args.grad_checkpoint, args.distributed)
        args.device = args.rt.device
        COMMANDS[args.command](args)
    except (CLIError, DataError, ValueError, runtime.LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
