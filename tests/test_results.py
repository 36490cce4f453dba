"""results/ holds the final Table-1 runs (the hard regime in results/, the easy one in results/easy/), and
the README's results blocks are their results.md files."""
import json

import pytest

from table1 import RESULTS, ROOT, readme_with_results


@pytest.mark.parametrize("name", RESULTS)
def test_the_readme_shows_the_committed_results_md_and_says_what_made_it(name):
    readme, folder = (ROOT / "README.md").read_text(), (ROOT / name).parent
    assert readme_with_results(readme, name, (ROOT / name).read_text()) == readme, \
        f"README.md's block of {name} differs from the file: run `python table1.py --readme`"
    made = json.loads((folder / "run.json").read_text())
    assert made["command"].startswith("python cagsr.py table1") and {"cpu", "torch", "threads"} <= made.keys()
    results = json.loads((folder / "results.json").read_text())
    assert set(results) == {"qa", "instruct"} and all("ci95" in m["oracle"] for d in results.values() for m in d.values())
    for file in ("results.png", "claims.json", "per_prompt.json", "diagnose.json", "diagnose.png"):
        assert (folder / file).stat().st_size > 0
