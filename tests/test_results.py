"""results/ is the final Table-1 run's output, and the README's results block is results/results.md."""
import json

from table1 import RESULTS_DIR, readme_with_results


def test_the_readme_shows_the_committed_results_md_and_says_what_made_it():
    readme = (RESULTS_DIR.parent / "README.md").read_text()
    assert readme_with_results(readme, (RESULTS_DIR / "results.md").read_text()) == readme, \
        "README.md's results block differs from results/results.md: run `python table1.py --readme`"
    made = json.loads((RESULTS_DIR / "run.json").read_text())
    assert made["command"].startswith("python cagsr.py table1") and {"cpu", "torch", "threads"} <= made.keys()
    results = json.loads((RESULTS_DIR / "results.json").read_text())
    assert set(results) == {"qa", "instruct"} and all("ci95" in m["oracle"] for d in results.values() for m in d.values())
    for name in ("results.png", "diagnose.json", "diagnose.png"):
        assert (RESULTS_DIR / name).stat().st_size > 0
