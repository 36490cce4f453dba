"""Run the tutorial chapters: execute every ```python block of a chapter in order and write what it
printed into the ```output block under it, so the numbers in a chapter always come from running it.

    python tutorial/run.py            # every chapter, in order; regenerates tutorial/figures/*.png
    python tutorial/run.py 03 05      # chapters whose file name starts with 03 or 05
    python tutorial/run.py --check    # execute only, leave the Markdown as it is

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
from pathlib import Path

import torch

THREADS = 2
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# a ```python block, optionally followed by the ```output block a previous run wrote under it
BLOCK = re.compile(r"```python\n(?P<code>.*?)```\n(?:\n```output\n.*?```\n)?", re.S)


def show(*objs):
    """Print the source of each function or class (a method is dedented), separated by a blank line."""
    print("\n\n".join(textwrap.dedent(inspect.getsource(obj)).rstrip("\n") for obj in objs))


def chapters(selected=()) -> list[Path]:
    paths = sorted(HERE.glob("[0-9][0-9]_*.md"))
    return [p for p in paths if not selected or any(p.name.startswith(s) for s in selected)]


def run_chapter(path: Path, write=True) -> list[str]:
    """Execute the chapter's python blocks in order; return what each printed (and, if `write`, put
    that into the Markdown as the block's output)."""
    text, namespace, outputs = path.read_text(), {"__name__": "__tutorial__"}, []
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for i, m in enumerate(BLOCK.finditer(text)):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    exec(compile(m["code"], f"{path.name}, block {i + 1}", "exec"), namespace)
                except SystemExit as e:  # a cagsr.main(...) call that failed
                    raise RuntimeError(f"{path.name}, block {i + 1}: the command exited with status {e.code}") from e
            outputs.append(buf.getvalue())
    finally:
        torch.set_num_threads(threads)
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
    args = p.parse_args(argv)
    paths = chapters(args.chapters)
    if not paths:
        sys.exit(f"error: no chapter matches {' '.join(args.chapters)} in {HERE}")
    sys.path.insert(0, str(REPO))
    with contextlib.chdir(REPO):
        (HERE / "figures").mkdir(exist_ok=True)
        for path in paths:
            t0 = time.time()
            run_chapter(path, write=not args.check)
            print(f"{path.name}: {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
