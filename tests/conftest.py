"""Shared fixtures: a real run directory made through the command line, and CLI helpers."""
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import cagsr

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "cagsr.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def assert_one_line_error(proc, *words):
    """Bad input: non-zero exit, exactly one line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


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
    log = cagsr.Metrics.log

    def crash(self, **row):
        if row["step"] == step:
            raise KeyboardInterrupt
        log(self, **row)

    monkeypatch.setattr(cagsr.Metrics, "log", crash)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(cagsr.Metrics, "log", log)
