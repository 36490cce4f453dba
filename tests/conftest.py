"""Shared fixtures: a real run directory made through the command line, the seed of the learning-effect
tests, and CLI helpers."""
import io
import os
import subprocess
import sys
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

import cagsr
import rundir

ROOT = Path(__file__).resolve().parents[1]
# A test marked `learning` asserts a learning effect (a loss falls, a reward rises, a model ranks well). Another
# processor rounds differently and takes training down another path, so such an effect must hold for every seed
# with margin, not only for the default one. The seed sweep that checks it (each test records its margin):
#   for s in 0 1 2 3 4; do CAGSR_TEST_SEED=$s python -m pytest -m learning --junitxml=seed$s.xml; done
SEED = int(os.environ.get("CAGSR_TEST_SEED", "0"))


def run_cli(*args, process=False):
    """`python cagsr.py *args` from the repository root, as a finished process: returncode, stdout, stderr.
    By default it runs in this process (cagsr.main, with sys.exit and any traceback caught as a process
    would report them), which saves each call the seconds of a fresh `import torch`; `process=True`
    starts a real one, for the tests that must see what a shell sees."""
    if process:
        return subprocess.run([sys.executable, str(ROOT / "cagsr.py"), *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=1800)  # a guard against hangs, not a timing assertion
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    returncode = 0
    try:
        os.chdir(ROOT)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cagsr.main(list(args))
            except SystemExit as e:  # as the interpreter reports it: None is 0, a message goes to stderr with 1
                if isinstance(e.code, int) or e.code is None:
                    returncode = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    returncode = 1
            except Exception:  # what the interpreter would print before exiting with status 1
                traceback.print_exc()
                returncode = 1
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["cagsr.py", *args], returncode, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *words):
    """Bad input: non-zero exit, exactly one line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def seed():
    """The seed of a learning-effect test: 0, or CAGSR_TEST_SEED for the seed sweep."""
    return SEED


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """Tokenizer, IDF table and a 2-step SFT checkpoint, made through the CLI as a user would."""
    run = tmp_path_factory.mktemp("run")
    for args in (["prepare"], ["sft", "--steps", "2", "--batch-size", "8"]):
        proc = run_cli(*args, "--out", str(run))
        assert proc.returncode == 0, proc.stderr
    return run


@contextmanager
def interrupted_at_step(monkeypatch, step: int):
    """Simulate Ctrl-C while the metrics of `step` are being logged; the body must be interrupted."""
    log = rundir.Metrics.log

    def crash(self, **row):
        if row["step"] == step:
            raise KeyboardInterrupt
        log(self, **row)

    monkeypatch.setattr(rundir.Metrics, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(rundir.Metrics, "log", log)
