"""Rerun the whole tutorial with other seeds, to see which of its numbers hold and which are one seed's.

    python tutorial/sweep.py --seeds 0-4            # 5 seeds, 2 at a time on 1 thread each
    python tutorial/sweep.py --report               # which asserts failed in the last sweep

The committed tutorial/sweep.json was made on a 2-core Intel Xeon with `--seeds 0 --jobs 1 --threads 2`
(seed 0 as run.py runs the chapters, so it is the run the chapters print) and `--seeds 1-4` (1 thread
each), then both again with `--reuse` once the chapters' asserts had been rewritten. It was last
rerun on 2026-12-03, when chapter 1's SFT model went from 600 to 300 steps, from scratch for seeds
1–4 (21 minutes); seed 0's entry is the `--reuse` pass over the runs/tutorial that
`python tutorial/run.py` had just made from a clean slate (the same runs bit for bit: same machine,
code, seed and 2 threads).

Each seed runs every chapter in order in its own folder, runs/sweep/seed<k>/, with TUTORIAL_SEED=k:
chapter 1 then trains its SFT model with --seed k, and every later chapter (their RL runs included)
starts from that model, so the whole story is retold from a different starting point. That is the
practical stand-in for another processor: a different CPU rounds differently, an RL run amplifies the
difference, and a fact that holds for five seeds with margin is one we can state for any machine.

`--reuse` executes the chapters again over the runs a previous sweep left in runs/sweep/seed<k>/ (a
chapter's lines that delete earlier runs become `pass`, so every RL run is reused and only the evaluation
is recomputed): the way to check a rewritten assert or a new printout against every seed in minutes,
as long as the code that trains is unchanged.

A failing assert does not stop a seed's run; it is recorded (chapter, block, line) and the next block
runs. For every chapter the sweep keeps the scalar results the chapter computed (its top-level numbers
and dicts of numbers), and writes everything to tutorial/sweep.json, which the chapters read to show
the spread over seeds next to seed 0's story.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "sweep.json"
# the model the sweep ran: bump when model.py's architecture changes, so that the chapters say when the
# spread they print is an older model's (sweep.json files without the key predate the T5 model)
ARCHITECTURE = "t5"


def scalars(namespace: dict) -> dict:
    """The numbers a chapter computed: top-level ints/floats, 0-d tensors and (small) dicts of them, keys
    joined by '/'."""
    out = {}

    def walk(prefix, value, depth):
        if isinstance(value, bool) or depth > 5:
            return
        if isinstance(value, (int, float)):
            out[prefix] = float(value)
        elif hasattr(value, "ndim") and getattr(value, "ndim", 1) == 0 and hasattr(value, "item"):
            out[prefix] = float(value.item())
        elif isinstance(value, dict) and len(value) <= 100:  # not lookup tables such as an IDF
            for k, v in value.items():
                walk(f"{prefix}/{'/'.join(map(str, k)) if isinstance(k, tuple) else k}", v, depth + 1)

    for name, value in namespace.items():
        if not name.startswith("_"):
            walk(name, value, 0)
    return out


def run_seed(seed: int, threads: int, reuse=False) -> dict:
    """Every chapter for one seed, in the current directory; failures are recorded, not raised."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tutorial_run", HERE / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    Path("tutorial/figures").mkdir(parents=True, exist_ok=True)
    report, printed = {}, {}
    for path in run.chapters():
        t0 = time.time()
        outputs, failures, namespace = run.execute(path, threads, keep_going=True,
                                                   rewrite=run.reusing if reuse else None)
        printed.update({f"{path.name}, block {i + 1}": out for i, out in enumerate(outputs)})
        report[path.name] = {"seconds": round(time.time() - t0, 1), "failures": failures, "values": scalars(namespace)}
        print(f"seed {seed}: {path.name} {time.time() - t0:.0f} s, {len(failures)} failure(s)", file=sys.stderr)
    Path("printed.json").write_text(json.dumps(printed, indent=1))  # what each block printed, for reading
    return report


RL_KEYS = ("reward", "coverage", "focus", "repeat", "attn_entropy", "kl", "entropy", "length")


def rl_runs(root: Path) -> dict:
    """Every RL run a seed's chapters trained (root/runs/tutorial/**/metrics.jsonl): the means of its first and
    last five iterations and its last row, for the RL_KEYS."""
    out = {}
    for path in sorted((root / "runs" / "tutorial").rglob("metrics.jsonl")):
        rows = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("stage") == "rl"]
        if rows:
            out[str(path.parent.relative_to(root / "runs" / "tutorial"))] = {
                part: {k: sum(r[k] for r in sel) / len(sel) for k in RL_KEYS}
                for part, sel in (("first5", rows[:5]), ("last5", rows[-5:]), ("last", rows[-1:]))}
    return out


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


class Seed:
    """One seed of the last sweep, as the chapters read it."""

    def __init__(self, seed: str, sweep: dict):
        self.seed, self.chapters, self.runs = int(seed), sweep["seeds"][seed], sweep["rl_runs"].get(seed, {})

    def value(self, chapter: str, key: str) -> float:
        """A number chapter `chapter` (file-name prefix, e.g. "09") computed, e.g. "results/SFT/qa/accuracy"."""
        name = next((n for n in self.chapters if n.startswith(chapter)), None)
        if name is None:
            raise KeyError(f"no chapter {chapter} in {RESULTS.name} for seed {self.seed}: rerun tutorial/sweep.py")
        return self.chapters[name]["values"][key]

    def run(self, name: str, part: str, key: str) -> float:
        """An RL run's mean of `key` over its "first5" or "last5" iterations, or its "last" row."""
        return self.runs[name][part][key]


def seeds() -> list[Seed]:
    sweep = json.loads(RESULTS.read_text())
    return [Seed(s, sweep) for s in sorted(sweep["seeds"], key=int)]


def table(columns: dict, digits=3) -> dict[str, list[float]]:
    """Print one row per seed of the last sweep, column name -> function(Seed) -> number, then each column's
    min and max; return the columns."""
    rows = seeds()
    made_with = json.loads(RESULTS.read_text()).get("architecture", "pre-t5")
    if made_with != ARCHITECTURE:
        print(f"(five-seed sweep of the previous model ({made_with}), not of today's {ARCHITECTURE}: "
              "rerun python tutorial/sweep.py)")
    cols = {name: [f(s) for s in rows] for name, f in columns.items()}
    width = max(10, *(len(n) + 2 for n in cols))
    print("seed" + "".join(f"{n:>{width}}" for n in cols))
    for i, s in enumerate(rows):
        print(f"{s.seed:4}" + "".join(f"{v[i]:{width}.{digits}f}" for v in cols.values()))
    for what, pick in (("min", min), ("max", max)):
        print(f"{what:4}" + "".join(f"{pick(v):{width}.{digits}f}" for v in cols.values()))
    return cols


def report(results: dict):
    """Which asserts failed for which seeds, and the spread of every value that differs between seeds."""
    seeds = sorted(results, key=int)
    print(f"seeds {', '.join(seeds)}")
    failed = {}
    for s in seeds:
        for chapter, r in results[s].items():
            for f in r["failures"]:
                failed.setdefault((chapter, f["block"], f["code"]), []).append(s)
    for (chapter, block, code), who in sorted(failed.items()):
        print(f"FAILS {chapter} block {block} seeds {','.join(who)}: {code}")
    if not failed:
        print("every assert of every chapter held for every seed")


def write_results(out: Path, results: dict, threads: int) -> None:
    """Merge finished seeds' reports ({seed: report}) into tutorial/sweep.json, with the RL runs each left
    under `out`; entries of another architecture are dropped, so a table never mixes two models."""
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if old.get("architecture") != ARCHITECTURE:
        old = {}
    every = old.get("seeds", {}) | results
    runs = old.get("rl_runs", {}) | {s: rl_runs(out / f"seed{s}") for s in results}
    threads_of = old.get("threads", {}) | {s: threads for s in results}
    RESULTS.write_text(json.dumps({"architecture": ARCHITECTURE, "threads": threads_of, "seeds": every,
                                   "rl_runs": runs}, indent=1) + "\n")
    report(every)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,3 (default 0-4)")
    p.add_argument("--jobs", type=int, default=2, help="seeds run at the same time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per seed (default 1)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "sweep", help="folder of the seeds' runs")
    p.add_argument("--reuse", action="store_true", help="rerun the chapters over the RL runs of a previous sweep")
    p.add_argument("--collect", action="store_true",
                   help="only merge the seeds' finished report.json files (e.g. of an interrupted sweep) into sweep.json")
    p.add_argument("--report", action="store_true", help="print the last sweep's table and exit")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one seed here
    args = p.parse_args(argv)
    if args.one is not None:
        sys.path.insert(0, str(REPO))
        print(json.dumps(run_seed(args.one, args.threads, args.reuse)))
        return
    if args.report:
        return report(json.loads(RESULTS.read_text())["seeds"])
    seeds, procs, results = parse_seeds(args.seeds), {}, {}
    if args.collect:
        return write_results(args.out, {str(s): json.loads((args.out / f"seed{s}" / "report.json").read_text())
                                        for s in seeds}, args.threads)
    pending = list(seeds)
    while pending or procs:
        while pending and len(procs) < args.jobs:
            seed = pending.pop(0)
            d = args.out / f"seed{seed}"
            d.mkdir(parents=True, exist_ok=True)
            env = os.environ | {"TUTORIAL_SEED": str(seed), "OMP_NUM_THREADS": str(args.threads)}
            if args.reuse and not (d / "runs" / "tutorial" / "sft.pt").exists():
                sys.exit(f"error: --reuse needs a previous sweep's runs in {d}")
            procs[seed] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--one", str(seed),
                                            "--threads", str(args.threads)] + ["--reuse"] * args.reuse, cwd=d, env=env,
                                           stdout=open(d / "report.json", "w"), stderr=open(d / "log.txt", "w"))
            print(f"sweep: seed {seed} started in {d} (progress: {d / 'log.txt'})", file=sys.stderr)
        time.sleep(2)
        for seed, proc in list(procs.items()):
            if proc.poll() is not None:
                del procs[seed]
                if proc.returncode:
                    sys.exit(f"error: seed {seed} crashed (status {proc.returncode}); see {args.out / f'seed{seed}'}")
                results[str(seed)] = json.loads((args.out / f"seed{seed}" / "report.json").read_text())
    write_results(args.out, results, args.threads)


if __name__ == "__main__":
    main()
