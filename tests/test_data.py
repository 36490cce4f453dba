"""Specification of the data sets (§7.1) and the tokenizer."""
from collections import Counter

import pytest

import evaluate
from conftest import run_cli
from data import (DATA_DIR, DATASETS, INSTRUCT_PROMPT_TOKENS, INSTRUCT_RESPONSE_TOKENS,
                  QA_ANSWER_TOKENS, QA_PROMPT_TOKENS, QA_QUESTION_TOKENS, SPLITS, TINY_VOCAB, DataError, Tokenizer,
                  generate, length_stats, format_stats, load_split, train_tokenizer, training_texts,
                  write_all)

SIZES = {"qa": 10_000, "instruct": 5_000}


@pytest.fixture(scope="module")
def records():
    return {d: generate(d) for d in DATASETS}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(training_texts(), TINY_VOCAB, tmp_path_factory.mktemp("tok") / "tiny.model")


# --- generation -----------------------------------------------------------------------------------

def test_generator_reproduces_committed_files(tmp_path):
    write_all(tmp_path)
    for d in DATASETS:
        for s in SPLITS:
            name = f"{d}/{s}.jsonl"
            assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), \
                f"data/{name} is stale: run `python -m data.synth`"


def test_same_seed_same_data_other_seed_differs(records):
    for d in DATASETS:
        assert generate(d, seed=0) == records[d]
        assert generate(d, seed=1) != records[d]


def test_sizes_and_exact_80_10_10_split(records):
    for d in DATASETS:
        n = SIZES[d]
        assert len(records[d]) == n
        assert Counter(r["split"] for r in records[d]) == {"train": n * 8 // 10, "validation": n // 10,
                                                          "test": n // 10}
        assert [r["id"] for r in records[d]] == [f"{d}-{i:05d}" for i in range(n)]


def test_committed_files_load_in_id_order(records):
    for d in DATASETS:
        loaded = [r for s in SPLITS for r in load_split(d, s)]
        assert sorted(loaded, key=lambda r: r["id"]) == records[d]
        for s in SPLITS:
            ids = [r["id"] for r in load_split(d, s)]
            assert ids == sorted(ids)


def test_plain_ascii_single_line_fields(records):
    for d in DATASETS:
        for r in records[d]:
            for text in (r["prompt"], r["response"]):
                assert text.isascii() and "\n" not in text and "\t" not in text
                assert text == text.strip() and "  " not in text


def test_every_evaluated_qa_fact_is_taught_in_training(records):
    key = lambda r: (r["entity"], r["category"], r["fact"])
    taught = {key(r) for r in records["qa"] if r["split"] == "train"}
    assert len(taught) == 1000
    for r in records["qa"]:
        assert key(r) in taught
        assert r["fact"] in r["response"] and r["entity"] in r["prompt"]
        assert r["keywords"] == [r["entity"], r["fact"]]


def test_every_instruct_topic_and_task_is_in_training(records):
    strata = lambda split: {(r["topic"], r["task"]) for r in records["instruct"] if r["split"] == split}
    assert strata("test") <= strata("train") and strata("validation") <= strata("train")
    assert {r["task"] for r in records["instruct"]} == {"brainstorm", "explain", "compose"}
    assert 40 <= len({r["topic"] for r in records["instruct"]}) <= 60
    for r in records["instruct"]:
        assert all(item in r["prompt"] and item in r["response"].lower() for item in r["required"])


def test_no_train_test_duplicates(records):
    for d in DATASETS:
        pair = lambda split: {(r["prompt"], r["response"]) for r in records[d] if r["split"] == split}
        assert not pair("train") & pair("test")
        assert len({(r["prompt"], r["response"]) for r in records[d]}) == SIZES[d]


# --- tokenizer ------------------------------------------------------------------------------------

def test_lengths_lie_in_the_papers_ranges(records, tokenizer):
    stats = length_stats(records["qa"] + records["instruct"], tokenizer)
    bounds = {("qa", "question"): QA_QUESTION_TOKENS, ("qa", "response"): QA_ANSWER_TOKENS,
              ("qa", "prompt"): QA_PROMPT_TOKENS,
              ("instruct", "prompt"): INSTRUCT_PROMPT_TOKENS,
              ("instruct", "response"): INSTRUCT_RESPONSE_TOKENS}
    for (d, field), (lo, hi) in bounds.items():
        s = stats[d][field]
        assert lo <= s["min"] <= s["p50"] <= s["max"] <= hi, (d, field, s)
        assert s["min"] <= s["mean"] <= s["max"]
    table = format_stats(stats)
    assert len(table.splitlines()) == 6 and len({len(line) for line in table.splitlines()}) == 1


def test_tokenizer_training_is_byte_identical(tokenizer, tmp_path):
    again = train_tokenizer(training_texts(), TINY_VOCAB, tmp_path / "again.model")
    assert again.path.read_bytes() == tokenizer.path.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_every_line_round_trips(records, tokenizer):
    texts = [r[f] for d in DATASETS for r in records[d] for f in ("prompt", "response")]
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert tokenizer.decode(ids) == text
    assert all(tokenizer.unk_id not in ids for ids in tokenizer.encode_batch(texts))


def test_special_ids_and_decode_conventions(tokenizer):
    t = tokenizer
    assert (t.pad_id, t.eos_id, t.unk_id) == (0, 1, 2) and t.sp.bos_id() == -1  # T5's ids, no BOS
    assert len(t.pieces) == t.vocab_size <= TINY_VOCAB
    ids = t.encode("The capital of Zorvania is Miltown.")
    assert ids[-1] == t.eos_id and t.eos_id not in ids[:-1]
    # decoding stops at EOS, skips padding and ids the model may have beyond the tokenizer's vocab
    assert t.decode([t.pad_id] + ids + t.encode("junk") + [t.pad_id]) == "The capital of Zorvania is Miltown."
    assert t.decode(ids[:-1] + [t.vocab_size + 5]) == "The capital of Zorvania is Miltown."
    # text outside the training alphabet still round-trips, through byte fallback rather than <unk>
    assert t.decode(t.encode("caf\u00e9 \u2713")) == "caf\u00e9 \u2713"


def test_tokenizer_file_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="missing.model.*missing"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.model.*corrupt") as e:
        Tokenizer(tmp_path / "bad.model")
    assert "\n" not in str(e.value)


# --- load_split errors ----------------------------------------------------------------------------

def test_load_split_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="unknown"):
        load_split("wiki", "train")
    with pytest.raises(DataError, match="unknown"):
        load_split("qa", "dev")
    with pytest.raises(DataError, match=r"qa/train\.jsonl.*missing.*prepare"):
        load_split("qa", "train", root=tmp_path)
    (tmp_path / "qa").mkdir()
    good = '{"id": "qa-00000", "prompt": "a", "response": "b"}'
    (tmp_path / "qa" / "train.jsonl").write_text(good + '\n{"id": oops\n')
    with pytest.raises(DataError, match=r"qa/train\.jsonl: line 2 is corrupt") as e:
        load_split("qa", "train", root=tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "qa" / "test.jsonl").write_bytes(b"\xff\xfe\n")
    with pytest.raises(DataError, match="line 1 is corrupt"):
        load_split("qa", "test", root=tmp_path)


# --- the hard regime (data/hard.py) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def hard_records():
    from data import hard
    return {d: hard.generate(d) for d in DATASETS}


def test_hard_generator_reproduces_committed_files(tmp_path, hard_records):
    from data import hard
    hard.write_all(tmp_path)
    for d in DATASETS:
        for s in SPLITS:
            name = f"{d}/{s}.jsonl"
            assert (tmp_path / name).read_bytes() == (hard.HARD_DIR / name).read_bytes(), \
                f"data/hard/{name} is stale: run `python -m data.hard`"
        n = SIZES[d]
        assert Counter(r["split"] for r in hard_records[d]) == {"train": n * 8 // 10, "validation": n // 10,
                                                                "test": n // 10}


def test_hard_qa_needs_the_right_one_of_two_values_in_half_the_prompts_and_cannot_be_memorised(hard_records):
    values, rivals = {}, 0
    for r in hard_records["qa"]:
        context = r["prompt"][: -len(r["question"])]
        assert f"{r['entity']} " in context and r["fact"] in context and r["fact"] in r["response"]
        assert context.count(".") == 3  # three facts
        if r["distractor"] is not None:  # a same-kind rival value that must not be the answer
            rivals += 1
            assert r["distractor"] in context and r["distractor"] != r["fact"] and r["distractor"] not in r["response"]
        values.setdefault((r["entity"], r["category"]), set()).add(r["fact"])
    assert rivals == len(hard_records["qa"]) // 2
    assert sum(len(v) > 1 for v in values.values()) > 0.9 * len(values)  # the value changes from prompt to prompt


def test_hard_instructions_name_two_to_four_items_and_the_answer_covers_each(hard_records):
    counts = Counter()
    for r in hard_records["instruct"]:
        counts[r["task"], len(r["required"])] += 1
        assert all(item in r["prompt"] and item.lower() in r["response"].lower() for item in r["required"])
    assert set(counts) == {("brainstorm", 3), ("brainstorm", 4), ("compose", 3), ("explain", 2)}


def test_two_thirds_of_the_hard_instructions_need_the_asked_persons_items_and_infer_the_topic(hard_records):
    """The rival form lists as many items of another topic for another person, and names no topic, so only
    binding the asked person to a list answers it."""
    from data import hard
    rivals = [r for r in hard_records["instruct"] if r["distractor"] is not None]
    assert abs(len(rivals) / len(hard_records["instruct"]) - 2 / 3) < 0.02
    for r in rivals:
        assert len(r["distractor"]) == len(r["required"]) and not {*r["distractor"]} & {*r["required"]}
        assert all(w in r["prompt"] and not evaluate.states_fact(r["response"], w) for w in r["distractor"])
        assert not evaluate.states_fact(r["prompt"], r["topic"])
        asked = r["prompt"].split()[-2].removesuffix("'s")
        assert asked in hard.PEOPLE and f"{asked}'s list: {hard._listing(r['required'])}." in r["prompt"]


def test_the_hard_regime_fits_the_tiny_model(tmp_path):
    """`prepare --data data/hard` accepts every record: with the tokenizer it trains on the hard sets, no
    prompt or response is longer than the tiny model's 64 tokens (a 140-character answer once took 67)."""
    proc = run_cli("prepare", "--out", str(tmp_path), "--data", "data/hard")
    assert proc.returncode == 0, proc.stderr[-500:]
