"""A user's own prompts, and the one accessor every stage reads its records through.

`--data FILE.jsonl`, or `--data FOLDER` holding train.jsonl and validation.jsonl (and test.jsonl, else
the test split is the validation split): one JSON object per line, {"prompt": "...", "response": "..."}; `response` may be left out for RL-only
runs (`rl --init`), which need only prompts. From a single file every tenth record (the 10th, 20th, …)
is held out as the validation and test split; the rest trains. Without `--data` (or with the folder of
data/synth.py's files) the stages read the two synthetic data sets, exactly as before.
"""
import json
from pathlib import Path

from data.synth import DATA_DIR, DATASETS, DataError, load_split

USER = "user"  # the name of a user's data set, beside the synthetic "qa" and "instruct"
HOLD_OUT = 10  # a single file: every HOLD_OUT-th record is held out


def is_user_data(data) -> bool:
    data = Path(data)
    return data.suffix == ".jsonl" or (data.is_dir() and (data / "train.jsonl").is_file())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a user's JSONL file; a bad line is one DataError naming the file and line."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise DataError(f"{path}:{n}: not a JSON object ({str(e).splitlines()[0]})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise DataError(f"{path}:{n}: needs a non-empty string \"prompt\"")
        if "response" in rec and not isinstance(rec["response"], str):
            raise DataError(f"{path}:{n}: \"response\" must be a string")
        records.append({**rec, "id": f"{path}:{n}", "dataset": USER})  # the id names the line in later errors
    if not records:
        raise DataError(f"{path}: no records (one JSON object per line: {{\"prompt\": ..., \"response\": ...}})")
    return records


def user_split(data, split: str) -> list[dict]:
    """One split of a user's data: see the module docstring."""
    data = Path(data)
    if data.suffix == ".jsonl":
        if not data.is_file():
            raise DataError(f"{data}: file is missing")
        keep = (lambda i: i % HOLD_OUT == 0) if split != "train" else (lambda i: i % HOLD_OUT != 0)
        return [r for i, r in enumerate(read_jsonl(data), 1) if keep(i)]
    path = data / f"{split}.jsonl"
    if split == "test" and not path.exists():
        path = data / "validation.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: file is missing (a data folder holds train.jsonl and validation.jsonl, "
                        "test.jsonl if you have one)")
    return read_jsonl(path)


def data_sets(data=DATA_DIR) -> tuple[str, ...]:
    """The data sets behind --data: ("user",), or the synthetic ("qa", "instruct")."""
    return (USER,) if is_user_data(data) else DATASETS


def load(dataset: str, split: str, data=DATA_DIR) -> list[dict]:
    return user_split(data, split) if dataset == USER else load_split(dataset, split, data)


def records(split: str, data=DATA_DIR) -> list[dict]:
    """Every record of `split` behind --data: the user's, or both synthetic data sets' (qa, then instruct)."""
    return [r for d in data_sets(data) for r in load(d, split, data)]
