"""baselines.py (§7.3) as a specification: the baselines' learned reward models — automatic corruptions and
labels (Synthetic Preference RL), oracle preference pairs with §2.2's flips (Human Preference RL),
their training, the reward the RL loop calls, and the saved file."""

import random
from dataclasses import replace

import pytest
import torch

from data import DATA_DIR, load_split
from data.tokenizer import train_tokenizer, training_texts
from evaluate import degenerate, oracle_score, states_fact
from model import PRESETS, Rollout, Transformer
from baselines import (
    RewardModelConfig,
    fit,
    label_accuracy,
    pair_accuracy,
    CORRUPTIONS,
    LearnedReward,
    PreferenceRewardModel,
    SumReward,
    corrupt,
    encode_texts,
    human_preference_pairs,
    load_reward_model,
    save_reward_model,
    score_texts,
    synthetic_labels,
    train_bradley_terry_rm,
    train_classifier_rm,
    train_reward_model,
)

torch.set_num_threads(1)
CFG = replace(PRESETS["tiny"], d_model=32, n_heads=2, d_kv=16, d_ff=64, n_enc_layers=1, n_dec_layers=2)
STRUCTURAL = ("repeated", "truncated")  # what a randomly initialised body learns in 60 steps


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(training_texts(), 1536, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def records():
    return {ds: load_split(ds, "train")[::20] for ds in ("qa", "instruct")}


def fresh_rm(seed=0):
    torch.manual_seed(seed)
    return PreferenceRewardModel(Transformer(CFG))


# ---- corruptions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ds", ["qa", "instruct"])
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_changes_the_text_as_named(records, ds, kind):
    rng = random.Random(0)
    for record in records[ds][:50]:
        ref = record["response"]
        bad = corrupt(ref, record, kind, rng, records[ds])
        assert bad != ref
        if kind == "shuffled":
            assert sorted(bad.split()) == sorted(ref.split())
        elif kind == "truncated":
            assert ref.startswith(bad) and len(bad.split()) <= max(1, len(ref.split()) // 3)
        elif kind == "repeated":
            assert degenerate(bad, record)  # a loop: over the evaluator's repetition limit
        elif kind == "wrong_entity" and ds == "qa":
            assert not states_fact(bad, record["fact"])
        elif kind == "wrong_entity":
            assert not any(states_fact(bad, item) for item in record["required"])
        elif kind == "off_topic":
            assert oracle_score(bad, record) < oracle_score(ref, record)


def test_unknown_corruption_is_refused(records):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt("a b c", records["qa"][0], "reversed", random.Random(0), records["qa"])


@pytest.mark.parametrize("ds", ["qa", "instruct"])
def test_synthetic_labels_are_balanced_and_references_good(records, ds):
    recs = records[ds][:100]
    samples = [r["response"] if i % 2 else "word word word word word word" for i, r in enumerate(recs)]
    examples = synthetic_labels(recs, samples, random.Random(0))
    labels = [label for _, _, label in examples]
    assert labels.count(1) == labels.count(0) == 150  # 100 references + the 50 samples that pass
    good = {(p, y) for p, y, label in examples if label == 1}
    assert all((r["prompt"], r["response"]) in good for r in recs)
    assert not any("word word" in y for _, y, label in examples if label == 1)


# ---- preference pairs ----------------------------------------------------------------------------


def degraded_pairs(recs, seed):
    """References against loops, which the oracle scores 1 (< 5): no ties, so every pair is kept.
    (Not truncations: the instruct rubric does not ask for a complete sentence.)"""
    rng = random.Random(seed)
    return [r["response"] for r in recs], [corrupt(r["response"], r, "repeated", rng, recs) for r in recs]


def test_preference_pairs_follow_the_oracle_without_flips(records):
    rng = random.Random(0)
    for recs in (records["qa"][:100], records["instruct"][:100]):
        a = [r["response"] if i % 3 else corrupt(r["response"], r, "off_topic", rng, recs) for i, r in enumerate(recs)]
        b = [corrupt(r["response"], r, rng.choice(CORRUPTIONS), rng, recs) for r in recs]
        pairs = human_preference_pairs(recs, a, b, flip=0.0, rng=random.Random(1))
        by_prompt = {r["prompt"]: r for r in recs}
        assert 0 < len(pairs) < len(recs)  # ties are dropped
        assert all(oracle_score(c, by_prompt[p]) > oracle_score(x, by_prompt[p]) for p, c, x in pairs)


def test_flip_rate_matches_annotator_disagreement(records):
    recs = records["qa"][:200] + records["instruct"][:200]
    qa_refs, qa_loops = degraded_pairs(records["qa"][:200], 0)
    in_refs, in_loops = degraded_pairs(records["instruct"][:200], 0)
    pairs = human_preference_pairs(recs, qa_refs + in_refs, qa_loops + in_loops, flip=0.15, rng=random.Random(0))
    assert len(pairs) == 400
    flipped = sum(chosen != r["response"] for r, (_, chosen, _) in zip(recs, pairs)) / 400
    assert abs(flipped - 0.15) <= 0.05


# ---- training ------------------------------------------------------------------------------------


@pytest.mark.learning
def test_classifier_rm_separates_good_from_bad(tok, records, seed, record_property):
    train, held_out = records["qa"][:100], load_split("qa", "validation")[:100]
    rm = fresh_rm(seed)
    losses = train_classifier_rm(rm, tok, synthetic_labels(train, None, random.Random(seed), kinds=STRUCTURAL),
                                 RewardModelConfig(rm_steps=60), batch_size=32, lr=3e-3, seed=seed).losses
    assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10])
    accuracy = label_accuracy(rm, tok, synthetic_labels(held_out, None, random.Random(1), kinds=STRUCTURAL))
    record_property("held_out_accuracy", accuracy)
    assert accuracy >= 0.75


@pytest.mark.learning
def test_bradley_terry_rm_ranks_chosen_above_rejected(tok, records, seed, record_property):
    train, held_out = records["instruct"][:200], load_split("instruct", "validation")[:100]
    rm = fresh_rm(seed)
    pairs = human_preference_pairs(train, *degraded_pairs(train, seed), flip=0.0, rng=random.Random(seed))
    losses = train_bradley_terry_rm(rm, tok, pairs, RewardModelConfig(rm_steps=60), batch_size=32, lr=3e-3,
                                    seed=seed).losses
    assert losses[0] == pytest.approx(0.6931, abs=1e-4)  # zero head: r ≡ 0, −log σ(0) = log 2
    accuracy = pair_accuracy(rm, tok, human_preference_pairs(held_out, *degraded_pairs(held_out, 1), flip=0.0,
                                                             rng=random.Random(1)))
    record_property("held_out_pair_accuracy", accuracy)
    assert accuracy >= 0.75


def test_training_stops_when_held_out_accuracy_stalls_and_keeps_the_best_weights():
    rm = fresh_rm()
    measured, kept = iter([0.5, 0.7, 0.6, 0.65, 0.9]), {}

    def accuracy(m):  # measured at steps 2, 4, 6, 8, …: the best is step 4's, then two without a gain
        kept[2 * (len(kept) + 1)] = m.head.weight.detach().clone()
        return next(measured)

    cfg = RewardModelConfig(rm_steps=20, rm_eval_every=2, rm_patience=2)
    out = fit(rm, 4, lambda idx: ((rm.head.weight - 1) ** 2).sum(), accuracy, cfg, batch_size=2, lr=0.1, seed=0)
    assert out.history == [(2, 0.5), (4, 0.7), (6, 0.6), (8, 0.65)] and len(out.losses) == 8
    assert (out.accuracy, out.step) == (0.7, 4) and torch.equal(rm.head.weight, kept[4])
    assert not torch.equal(kept[4], kept[8])


# ---- the reward the RL loop calls ----------------------------------------------------------------


def fake_rollout(tok, recs, n):
    """n responses per prompt, as Transformer.generate lays them out (rows b·n … b·n+n−1)."""
    responses = [r["response"] for r in recs for _ in range(n)]
    src, tokens, mask = encode_texts(tok, [r["prompt"] for r in recs], responses, CFG.max_len)
    return Rollout(tokens, torch.zeros(tokens.shape), mask, None), src


def test_learned_reward_scores_every_sample_without_gradient(tok, records):
    recs = records["qa"][:3]
    rollout, src = fake_rollout(tok, recs, n=4)
    rm = fresh_rm()
    torch.nn.init.normal_(rm.head.weight)  # a non-zero head, so scores differ
    refs = [(r["prompt"], r["response"]) for r in records["qa"][:20]]
    R, terms = LearnedReward(rm, tok, refs)(rollout, src)
    assert R.shape == (12,) and torch.isfinite(R).all() and not R.requires_grad
    assert torch.equal(terms["rm"], R)
    raw = score_texts(rm, tok, [p for p, _ in refs], [y for _, y in refs])
    normalised, _ = LearnedReward(rm, tok, refs)(*fake_rollout(tok, records["qa"][:20], n=1))
    assert normalised.mean().abs() < 1e-4 and normalised.std(correction=0) == pytest.approx(1, abs=1e-3)
    assert not torch.allclose(raw, normalised)


def test_sum_reward_adds_weighted_terms(tok, records):
    rollout, src = fake_rollout(tok, records["qa"][:2], n=3)
    attention = lambda ro, s: (torch.ones(6), {"coverage": torch.ones(6)})  # noqa: E731
    learned = lambda ro, s: (torch.arange(6.0), {"rm": torch.arange(6.0)})  # noqa: E731
    R, terms = SumReward(attention, learned, weight=0.5)(rollout, src)
    assert torch.equal(R, 1 + 0.5 * torch.arange(6.0)) and set(terms) == {"coverage", "rm"}


# ---- the saved file ------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_scores(tok, records, tmp_path):
    rm = fresh_rm()
    torch.nn.init.normal_(rm.head.weight)
    path = tmp_path / "rm.pt"
    save_reward_model(rm, path)
    assert [p.name for p in tmp_path.iterdir()] == ["rm.pt"]  # the temporary file is gone
    loaded = load_reward_model(path, lambda: Transformer(CFG))
    prompts, ys = [r["prompt"] for r in records["qa"][:8]], [r["response"] for r in records["qa"][:8]]
    assert torch.equal(score_texts(rm, tok, prompts, ys), score_texts(loaded, tok, prompts, ys))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_corrupt_reward_model_file_is_one_line_error(tmp_path, content):
    path = tmp_path / "rm.pt"
    if content is None:  # a reward model of another shape
        save_reward_model(PreferenceRewardModel(Transformer(replace(CFG, d_model=16))), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_reward_model(path, lambda: Transformer(CFG))
    assert "\n" not in str(err.value) and "not a reward model" in str(err.value)


def test_a_trained_synthetic_reward_model_keeps_its_held_out_accuracy(run_dir, tmp_path):
    for name in ("tokenizer.model", "sft.pt"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    cfg = RewardModelConfig(rm_steps=4, rm_eval_every=2, synthetic_prompts=6, held_out_prompts=4)
    path = train_reward_model("synthetic", tmp_path, cfg, DATA_DIR)
    saved = torch.load(path, weights_only=True)
    # 4 validation prompts per data set, each a reference (and a passing sample) with one corruption
    assert saved["held_out"]["items"] >= 16 and 0 <= saved["held_out"]["accuracy"] <= 1
    assert saved["held_out"]["step"] in (2, 4)
    assert train_reward_model("synthetic", tmp_path, cfg, DATA_DIR) == path  # once per run directory
