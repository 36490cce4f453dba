"""The tutorial as a specification: every chapter's code runs, in order, from a clean directory, and
draws every figure its text shows — so a chapter cannot drift from the code it explains. The facts a
chapter states are `assert`s inside its own code blocks."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"\]\((figures/[^)\s]+\.png)\)")  # ![...](figures/NN_name.png)


def runner():
    """tutorial/run.py, imported from its path (tutorial/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tutorial_run", ROOT / "tutorial" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chapters_keep_the_format():
    """Each ```output block sits right under the ```python block that printed it (run.py writes them;
    nobody edits them by hand), and every figure a chapter shows is in tutorial/figures."""
    run = runner()
    paths = run.chapters()
    assert paths, "no chapters in tutorial/"
    for path in paths:
        text = path.read_text()
        attached = sum("\n```output\n" in m.group(0) for m in run.BLOCK.finditer(text))
        assert attached == text.count("```output\n"), f"{path.name}: an output block not under a python block"
        for figure in FIGURE.findall(text):
            assert (ROOT / "tutorial" / figure).is_file(), f"{path.name} shows {figure}: run python tutorial/run.py"


@pytest.mark.slow
def test_every_chapter_runs_and_draws_its_figures(tmp_path, monkeypatch):
    """All chapters, in order, in one fresh directory (chapter 1 trains the model the later ones use)."""
    run = runner()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    (tmp_path / "tutorial" / "figures").mkdir(parents=True)
    paths = run.chapters()
    for path in paths:
        run.run_chapter(path, write=False)
    for path in paths:
        for figure in FIGURE.findall(path.read_text()):
            assert (tmp_path / "tutorial" / figure).is_file(), f"{path.name} shows {figure} but did not draw it"
