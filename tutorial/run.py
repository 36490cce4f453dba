"""Run the tutorial chapters: execute every ```python block of a chapter in order and write what it
printed into the ```output block under it, so the numbers in a chapter always come from running it.

    python tutorial/run.py            # every chapter, in order; regenerates tutorial/figures/*.png
    python tutorial/run.py 03 05      # chapters whose file name starts with 03 or 05
    python tutorial/run.py --check    # execute only, leave the Markdown as it is
    python tutorial/run.py 09 --reuse # over the runs a previous run left in runs/tutorial/ (see `reusing`)

A chapter shows the project's code under an equation with `from tutorial.run import show` and
`show(function)`: the source is read when the chapter runs, so what it shows is the code that runs.

Chapters run from the repository root, write their runs under runs/tutorial/ and their figures under
tutorial/figures/; the blocks of one chapter share one namespace, chapters do not. Torch runs them on
THREADS threads: the outputs were made so, and another thread count sums in another order, which
after hundreds of training steps gives other numbers.
"""
import argparse
import contextlib
import inspect
import io
import re
import sys
import textwrap
import time
import traceback
from pathlib import Path

import torch

THREADS = 2
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# a ```python block, optionally followed by the ```output block a previous run wrote under it
BLOCK = re.compile(r"```python\n(?P<code>.*?)```\n(?:\n```output\n.*?```\n)?", re.S)


# a chapter's "start from a clean slate" line (see `reusing`)
DELETES = re.compile(r"^(\s*).*(shutil\.rmtree|\.unlink\().*$", re.M)


def reusing(code: str) -> str:
    """A block with its deleting lines turned into `pass`: every stage it runs then finds its finished
    run (the commands reuse finished stages) and only what is computed from the runs is recomputed.
    The outputs are those of a fresh run as long as the training code is unchanged and the runs were
    made on this machine with the same thread count."""
    return DELETES.sub(r"\1pass", code)


def show(*objs):
    """Print the source of each function or class (a method is dedented), separated by a blank line."""
    print("\n\n".join(textwrap.dedent(inspect.getsource(obj)).rstrip("\n") for obj in objs))


def chapters(selected=()) -> list[Path]:
    paths = sorted(HERE.glob("[0-9][0-9]_*.md"))
    return [p for p in paths if not selected or any(p.name.startswith(s) for s in selected)]


def execute(path: Path, threads: int = THREADS, keep_going=False, rewrite=None):
    """Execute the chapter's python blocks in order, in one namespace, with torch on `threads` threads.
    Returns (outputs, failures, namespace): what each block printed, and — with `keep_going` — every
    failing block as {block, line, code, error} while the next block runs (without it, a failure
    raises). `rewrite(code)` may change a block before it runs (tutorial/sweep.py --reuse)."""
    namespace, outputs, failures = {"__name__": "__tutorial__"}, [], []
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, m in enumerate(BLOCK.finditer(path.read_text())):
            name, code = f"{path.name}, block {i + 1}", rewrite(m["code"]) if rewrite else m["code"]
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(compile(code, name, "exec"), namespace)
            except BaseException as e:  # noqa: BLE001 - a sweep records every kind of failure
                if not keep_going:
                    if isinstance(e, SystemExit):  # a cagsr.main(...) call that failed
                        raise RuntimeError(f"{name}: the command exited with status {e.code}") from e
                    raise
                frame = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == name]
                line = frame[-1].lineno if frame else 0
                text = code.splitlines()[line - 1].strip() if line else ""
                failures.append({"block": i + 1, "line": line, "code": text, "error": f"{type(e).__name__}: {e}"[:300]})
            outputs.append(buf.getvalue())
    finally:
        torch.set_num_threads(saved)
    return outputs, failures, namespace


def run_chapter(path: Path, write=True, reuse=False) -> list[str]:
    """Execute the chapter (with `reuse`, each block through `reusing`); return what each block printed
    (and, if `write`, put that into the Markdown as the block's output)."""
    text = path.read_text()
    outputs = execute(path, rewrite=reusing if reuse else None)[0]
    if write:
        it = iter(outputs)

        def with_output(m):
            out = next(it).rstrip("\n")
            return f"```python\n{m['code']}```\n" + (f"\n```output\n{out}\n```\n" if out else "")

        path.write_text(BLOCK.sub(with_output, text))
    return outputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chapters", nargs="*", help="file-name prefixes, e.g. 03 (default: all)")
    p.add_argument("--check", action="store_true", help="execute without rewriting the chapters")
    p.add_argument("--reuse", action="store_true", help="keep the runs a previous run left (see `reusing`)")
    args = p.parse_args(argv)
    paths = chapters(args.chapters)
    if not paths:
        sys.exit(f"error: no chapter matches {' '.join(args.chapters)} in {HERE}")
    sys.path.insert(0, str(REPO))
    with contextlib.chdir(REPO):
        (HERE / "figures").mkdir(exist_ok=True)
        for path in paths:
            t0 = time.time()
            run_chapter(path, write=not args.check, reuse=args.reuse)
            print(f"{path.name}: {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
