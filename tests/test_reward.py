"""reward.py as a specification: the mathematics of §3.2 stated as properties, plus worked numbers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reward import (
    aggregate_layers,
    cagsr_reward,
    coverage,
    fit_idf,
    focus,
    attention_entropy,
    important_token_mask,
    important_token_weights,
    important_words,
    load_idf,
    repeat_penalty,
    save_idf,
    tempered,
    worked_example,
)

FEW = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------------------
# Random batches: real attention rows over real prompt tokens, garbage wherever there is padding
# ------------------------------------------------------------------------------------------


def make_batch(seed, B, T, S, dtype=torch.float64, sharpness=1.0):
    """Ā with padded prompt columns at exactly 0 and padded response rows full of garbage."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, S + 1, (B,), generator=g)  # ≥ 1 real prompt token
    response_len = torch.randint(0, T + 1, (B,), generator=g)  # empty responses included
    prompt_mask = torch.arange(S) < prompt_len[:, None]  # [B, S]
    response_mask = torch.arange(T) < response_len[:, None]  # [B, T]
    logits = sharpness * torch.randn(B, T, S, generator=g, dtype=torch.float64)
    attn = logits.masked_fill(~prompt_mask[:, None, :], -math.inf).softmax(-1)  # [B, T, S]
    attn = torch.where(response_mask[..., None], attn, 3.7)  # garbage that must not leak
    important = prompt_mask & (torch.rand(B, S, generator=g) < 0.5)  # [B, S]
    response_ids = torch.randint(4, 8, (B, T), generator=g)  # a small vocabulary, so n-grams repeat
    response_ids = response_ids.masked_fill(~response_mask, 0)
    return dict(attn=attn.to(dtype), important=important, response_ids=response_ids,
                response_mask=response_mask), prompt_mask


@st.composite
def batches(draw, dtype=torch.float64):
    seed = draw(st.integers(0, 2**31 - 1))
    B, T, S = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    sharpness = draw(st.sampled_from([0.0, 1.0, 5.0, 50.0]))  # uniform … nearly one-hot
    return make_batch(seed, B, T, S, dtype, sharpness)


def terms(batch, **kw):
    return cagsr_reward(**batch, **kw)


def assert_same(r1, r2, atol=1e-12):
    for a, b, name in zip(r1, r2, r1._fields):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------
# The worked example (reused by the tutorial)
# ------------------------------------------------------------------------------------------


def test_worked_example_by_hand():
    # prompt of 4 tokens, I_x = {0, 1}; response of 3 tokens "7 7 7"; Ā rows:
    #   t=1: [0.5, 0.5, 0, 0]      mass on I_x = 1.0    entropy = log 2          = 0.693147
    #   t=2: [0.25]*4              mass on I_x = 0.5    entropy = log 4          = 1.386294
    #   t=3: [1, 0, 0, 0]          mass on I_x = 1.0    entropy = 0 (0·log 0 = 0)
    # coverage = (1.0 + 0.5 + 1.0) / (|y|·|I_x|) = 2.5 / (3·2) = 5/12               = 0.416667
    # focus    = −(log 2 + log 4 + 0) / 3 = −3·log 2 / 3 = −log 2                     = −0.693147
    # repeat   = bigrams (7,7), (7,7): the second occurred before → 1/2               = 0.5
    # total    = 1.0·5/12 + 0.5·(−log 2) − 1.0·1/2 = 0.416667 − 0.346574 − 0.5        = −0.429907
    r = cagsr_reward(**worked_example())
    assert r.coverage.item() == pytest.approx(5 / 12, abs=1e-12)
    assert r.focus.item() == pytest.approx(-math.log(2), abs=1e-12)
    assert r.repeat.item() == pytest.approx(0.5, abs=1e-12)
    assert r.total.item() == pytest.approx(5 / 12 - 0.5 * math.log(2) - 0.5, abs=1e-12)
    assert r.total.item() == pytest.approx(-0.429907, abs=1e-6)
    # the §6 floor h = 1.0 lifts steps 1 and 3 to 1.0: focus = −(1 + log 4 + 1) / 3
    assert focus(worked_example()["attn"], worked_example()["response_mask"], 1.0).item() == pytest.approx(
        -(2 + math.log(4)) / 3, abs=1e-12
    )


# ------------------------------------------------------------------------------------------
# Coverage
# ------------------------------------------------------------------------------------------


@FEW
@given(batches())
def test_coverage_between_0_and_one_over_size_of_I(batch_and_prompt):
    batch, _ = batch_and_prompt
    cov = coverage(batch["attn"], batch["important"], batch["response_mask"])
    size = batch["important"].sum(-1).clamp(min=1).double()
    assert (cov >= 0).all() and (cov <= 1 / size + 1e-12).all()


@FEW
@given(batches(), st.floats(1e-3, 0.5))
def test_coverage_reaches_one_over_size_of_I_exactly_when_all_mass_is_on_I(batch_and_prompt, leak):
    batch, prompt_mask = batch_and_prompt
    attn, important, mask = batch["attn"], batch["important"].clone(), batch["response_mask"]
    important[:, 0] = True  # |I_x| ≥ 1 (position 0 is always a real prompt token)
    on_I = (attn * important[:, None]).clamp(min=1e-3) * important[:, None]
    on_I = on_I / on_I.sum(-1, keepdim=True)  # [B, T, S]: all mass on I_x
    full = coverage(on_I, important, mask)
    size = important.sum(-1).double()
    has_steps = mask.any(-1)
    torch.testing.assert_close(full[has_steps], 1 / size[has_steps])
    # move `leak` of one step's mass to a real token outside I_x: coverage drops below 1/|I_x|
    outside = prompt_mask & ~important  # [B, S]
    b_ok = has_steps & outside.any(-1)
    j = outside.double().argmax(-1)  # first real token outside I_x
    leaked = on_I.clone()
    leaked[:, 0] *= 1 - leak
    leaked[torch.arange(len(j)), 0, j] += leak
    t0_real = mask[:, 0]
    drop = coverage(leaked, important, mask)
    assert (drop[b_ok & t0_real] < 1 / size[b_ok & t0_real] - 1e-9).all()


def test_coverage_is_zero_for_empty_I_and_empty_response():
    ex = worked_example()
    none = torch.zeros_like(ex["important"])
    assert coverage(ex["attn"], none, ex["response_mask"]).item() == 0.0
    r = cagsr_reward(ex["attn"], ex["important"], ex["response_ids"], torch.zeros_like(ex["response_mask"]))
    assert all(x.item() == 0.0 for x in r)


# ------------------------------------------------------------------------------------------
# Focus
# ------------------------------------------------------------------------------------------


@FEW
@given(batches())
def test_focus_between_minus_log_prompt_length_and_0(batch_and_prompt):
    batch, prompt_mask = batch_and_prompt
    foc = focus(batch["attn"], batch["response_mask"])
    n_real = prompt_mask.sum(-1).double()
    assert (foc <= 0).all() and (foc >= -torch.log(n_real) - 1e-12).all()


@FEW
@given(st.integers(1, 9), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_focus_is_0_for_one_hot_rows_and_minus_log_S_for_uniform_rows(S, T, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, T, dtype=torch.bool)
    one_hot = torch.nn.functional.one_hot(torch.randint(0, S, (1, T), generator=g), S).double()
    assert focus(one_hot, mask).item() == 0.0
    uniform = torch.full((1, T, S), 1 / S, dtype=torch.float64)
    assert focus(uniform, mask).item() == pytest.approx(-math.log(S), abs=1e-12)
    # uniform over the real tokens of a padded prompt: −log(#real), padding changes nothing
    padded = torch.cat([uniform, torch.zeros(1, T, 3, dtype=torch.float64)], -1)
    assert focus(padded, mask).item() == pytest.approx(-math.log(S), abs=1e-12)


@FEW
@given(batches(), st.floats(0.0, 3.0))
def test_entropy_floor_caps_focus_at_minus_h(batch_and_prompt, h):
    batch, _ = batch_and_prompt
    mask = batch["response_mask"]
    floored = focus(batch["attn"], mask, entropy_floor=h)
    assert (floored[mask.any(-1)] <= -h + 1e-12).all()
    assert (floored <= focus(batch["attn"], mask) + 1e-12).all()  # a floor only ever lowers focus


# ------------------------------------------------------------------------------------------
# Repetition penalty
# ------------------------------------------------------------------------------------------


@FEW
@given(batches(), st.integers(1, 4))
def test_repeat_penalty_in_0_1(batch_and_prompt, n):
    batch, _ = batch_and_prompt
    rep = repeat_penalty(batch["response_ids"], batch["response_mask"], n)
    assert ((rep >= 0) & (rep <= 1)).all()


@FEW
@given(st.integers(0, 12), st.integers(1, 3))
def test_repeat_penalty_is_0_without_repeats(T, n):
    ids = torch.randperm(20)[:T][None]  # distinct tokens: no n-gram can repeat
    assert repeat_penalty(ids, torch.ones_like(ids, dtype=torch.bool), n).item() == 0.0


@FEW
@given(st.integers(1, 20), st.integers(0, 5))
def test_repeat_penalty_of_a_run_of_one_token(m, pad):
    # m copies of one token have m−1 bigrams, all equal: every one but the first repeats
    ids = torch.tensor([[9] * m + [0] * pad])
    mask = torch.tensor([[True] * m + [False] * pad])
    expected = (m - 2) / (m - 1) if m >= 2 else 0.0
    assert repeat_penalty(ids, mask, n=2).item() == pytest.approx(expected, abs=1e-7)


def test_repeat_penalty_examples():
    ids = torch.tensor([[1, 2, 1, 2, 3], [1, 2, 3, 1, 2]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    # row 0 bigrams 12 21 12 23: one repeat of 4; row 1: 12 23 31 12: one of 4
    assert repeat_penalty(ids, mask, 2).tolist() == [0.25, 0.25]
    # trigrams: row 0: 121 212 123 → 0 of 3; row 1: 123 231 312 → 0
    assert repeat_penalty(ids, mask, 3).tolist() == [0.0, 0.0]
    # unigrams: row 0 has 1,2 repeated → 2 of 5
    assert repeat_penalty(ids, mask, 1).tolist() == pytest.approx([0.4, 0.4])


# ------------------------------------------------------------------------------------------
# Invariances: padding, prompt order and batching change nothing
# ------------------------------------------------------------------------------------------


@FEW
@given(batches(), st.integers(0, 2**31 - 1))
def test_permuting_prompt_positions_changes_nothing(batch_and_prompt, seed):
    batch, _ = batch_and_prompt
    perm = torch.randperm(batch["attn"].shape[-1], generator=torch.Generator().manual_seed(seed))
    permuted = dict(batch, attn=batch["attn"][..., perm], important=batch["important"][:, perm])
    assert_same(terms(permuted), terms(batch))


@FEW
@given(batches(), st.integers(1, 4), st.integers(1, 4))
def test_appending_padding_changes_nothing(batch_and_prompt, extra_s, extra_t):
    batch, _ = batch_and_prompt
    B, T, S = batch["attn"].shape
    attn = torch.cat([batch["attn"], torch.zeros(B, T, extra_s, dtype=batch["attn"].dtype)], -1)
    important = torch.cat([batch["important"], torch.zeros(B, extra_s, dtype=torch.bool)], -1)
    wider = dict(batch, attn=attn, important=important)
    assert_same(terms(wider), terms(batch))
    garbage = torch.full((B, extra_t, S), float("nan"), dtype=batch["attn"].dtype)
    longer = dict(
        batch,
        attn=torch.cat([batch["attn"], garbage], 1),
        response_ids=torch.cat([batch["response_ids"], batch["response_ids"][:, :1].expand(B, extra_t)], 1),
        response_mask=torch.cat([batch["response_mask"], torch.zeros(B, extra_t, dtype=torch.bool)], 1),
    )
    assert_same(terms(longer), terms(batch))


@FEW
@given(batches())
def test_batching_equals_one_sequence_at_a_time(batch_and_prompt):
    batch, _ = batch_and_prompt
    whole = terms(batch)
    for b in range(batch["attn"].shape[0]):
        single = terms({k: v[b : b + 1] for k, v in batch.items()})
        assert_same(single, type(whole)(*(x[b : b + 1] for x in whole)))


# ------------------------------------------------------------------------------------------
# The total: linear in α, β, γ; finite; dtype-stable
# ------------------------------------------------------------------------------------------


@FEW
@given(batches(), *[st.floats(0.0, 5.0)] * 3, st.floats(0.0, 2.0))
def test_total_is_linear_in_alpha_beta_gamma(batch_and_prompt, alpha, beta, gamma, h):
    batch, _ = batch_and_prompt
    r = terms(batch, alpha=alpha, beta=beta, gamma=gamma, entropy_floor=h)
    torch.testing.assert_close(r.total, alpha * r.coverage + beta * r.focus - gamma * r.repeat)
    unit = [terms(batch, alpha=a, beta=b, gamma=c, entropy_floor=h).total for a, b, c in
            [(1, 0, 0), (0, 1, 0), (0, 0, 1)]]
    torch.testing.assert_close(r.total, alpha * unit[0] + beta * unit[1] + gamma * unit[2])


@FEW
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7),
       st.sampled_from([0.0, 1.0, 50.0]))
def test_finite_and_float32_agrees_with_float64(seed, B, T, S, sharpness):
    r64 = terms(make_batch(seed, B, T, S, torch.float64, sharpness)[0], entropy_floor=0.1)
    r32 = terms(make_batch(seed, B, T, S, torch.float32, sharpness)[0], entropy_floor=0.1)
    for a, b in zip(r64, r32):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, atol=1e-5, rtol=0)


def test_one_token_prompt():
    attn = torch.ones(2, 3, 1)  # a single prompt token gets all the attention
    mask = torch.tensor([[True, True, False], [True, False, False]])
    r = cagsr_reward(attn, torch.tensor([[True], [False]]), torch.tensor([[5, 6, 0], [5, 0, 0]]), mask)
    assert r.coverage.tolist() == [1.0, 0.0] and r.focus.tolist() == [0.0, 0.0] and r.repeat.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------
# Layer aggregation Ā
# ------------------------------------------------------------------------------------------


def test_aggregate_layers_averages_heads_then_the_last_layers():
    attn = torch.rand(4, 2, 3, 5, 6).softmax(-1)  # [L, B, H, T, S]
    torch.testing.assert_close(aggregate_layers(attn, 1), attn[3].mean(1))
    torch.testing.assert_close(aggregate_layers(attn, 3), (attn[1] + attn[2] + attn[3]).mean(1) / 3)
    torch.testing.assert_close(aggregate_layers(attn.mean(2), 2), attn[2:].mean(2).mean(0))  # [L, B, T, S]
    torch.testing.assert_close(aggregate_layers(attn, 4).sum(-1), torch.ones(2, 5))  # still distributions
    for bad in (0, 5):
        with pytest.raises(ValueError, match="last"):
            aggregate_layers(attn, bad)
    with pytest.raises(ValueError, match="shape"):
        aggregate_layers(attn[0, 0], 1)


# ------------------------------------------------------------------------------------------
# Bad input is refused, loudly
# ------------------------------------------------------------------------------------------


def test_raw_scores_and_bad_shapes_raise():
    ex = worked_example()
    attn, important, ids, mask = ex["attn"], ex["important"], ex["response_ids"], ex["response_mask"]
    scaled = attn.clone()
    scaled[0, 2] *= 3.7
    with pytest.raises(ValueError, match=r"sum to 1 .*got 3\.7 at batch 0, step 2.*softmax"):
        cagsr_reward(scaled, important, ids, mask)
    negative = attn.clone()
    negative[0, 0] = torch.tensor([1.5, -0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        focus(negative, mask)
    with pytest.raises(ValueError, match="non-negative"):
        focus(torch.full_like(attn, float("nan")), mask)
    with pytest.raises(ValueError, match="response_mask"):
        coverage(attn, important, mask[:, :2])
    with pytest.raises(ValueError, match="response_mask"):
        focus(attn, mask.long())
    with pytest.raises(ValueError, match="important"):
        coverage(attn, important[:, :3], mask)
    with pytest.raises(ValueError, match=r"\[B,T,S\]"):
        focus(attn[0], mask)
    with pytest.raises(ValueError, match="response_ids"):
        cagsr_reward(attn, important, ids[:, :2], mask)
    with pytest.raises(ValueError, match="response_ids"):
        repeat_penalty(ids, mask[:, :2])


# ------------------------------------------------------------------------------------------
# I_x: important tokens
# ------------------------------------------------------------------------------------------

PIECES = ["<pad>", "<s>", "</s>", "<unk>", "▁What", "▁is", "▁the", "▁capital", "▁of", "▁Zor", "vania", "?",
          "▁In", "▁year", "▁19", "8", "4", ",", "▁who", "▁ruled", "<0x41>", "▁", "."]
TRAIN = ["What is the capital of France?", "What is the capital of Spain?", "Who ruled the year?",
         "What is the year?"]


def ids(*pieces):
    return [PIECES.index(p) for p in pieces]


def test_fit_idf_is_smoothed_log_ratio():
    idf = fit_idf(TRAIN)
    assert idf["the"] == pytest.approx(math.log(5 / 5))  # in all 4 prompts → 0
    assert idf["capital"] == pytest.approx(math.log(5 / 3))  # in 2 of 4
    assert idf["spain"] == pytest.approx(math.log(5 / 2))  # punctuation stripped, lowercased
    assert "?" not in idf and "Spain" not in idf


def test_important_tokens_of_real_looking_prompts():
    prompts = torch.tensor([
        [1] + ids("▁What", "▁is", "▁the", "▁capital", "▁of", "▁Zor", "vania", "?") + [2, 0, 0],
        [1] + ids("▁In", "▁the", "▁year", "▁19", "8", "4", ",", "▁who", "▁ruled", "?") + [2],
    ])
    mask = important_token_mask(prompts, fit_idf(TRAIN), PIECES, top_k=1)
    chosen = [[PIECES[i] for i, m in zip(row, mrow) if m] for row, mrow in zip(prompts.tolist(), mask.tolist())]
    # "Zorvania": a capitalised word, unknown to the IDF table (so also the highest IDF): both pieces
    assert chosen[0] == ["▁Zor", "vania"]
    # "1984" is a number (all three pieces); "In" opens the prompt, so its capital says nothing;
    # top_k=1 adds the rarest remaining word, "in" (unseen in training)
    assert chosen[1] == ["▁In", "▁19", "8", "4"]
    assert important_words(prompts, fit_idf(TRAIN), PIECES, top_k=1) == [["Zorvania"], ["In", "1984"]]
    never = torch.isin(prompts, torch.tensor([0, 1, 2, 3] + ids("?", ",")))
    assert not (mask & never).any()
    # more IDF words with a larger top_k, never padding/special/punctuation
    mask3 = important_token_mask(prompts, fit_idf(TRAIN), PIECES)  # default top_k = 3
    assert mask3[0].tolist() == [False, False, False, False, True, True, True, True, False, False, False, False]
    assert not (mask3 & never).any()


def test_threshold_byte_pieces_and_argument_checks():
    idf = fit_idf(TRAIN)
    prompt = torch.tensor([[1] + ids("▁the", "▁capital", "▁", "<0x41>", ".", "▁the") + [2]])
    # threshold log(5/3): "capital" (log 5/3) and the unseen byte word "A" (max idf); "." never
    assert important_token_mask(prompt, idf, PIECES, threshold=math.log(5 / 3) - 1e-9)[0].tolist() == [
        False, False, True, False, True, False, False, False]
    # no word reaches IDF 10, but "A" is capitalised mid-sentence: an entity, chosen anyway
    assert important_words(prompt, idf, PIECES, threshold=10.0) == [["A"]]
    with pytest.raises(ValueError, match="not both"):
        important_token_mask(prompt, idf, PIECES, threshold=1.0, top_k=2)
    with pytest.raises(ValueError, match="piece list"):
        important_token_mask(torch.tensor([[len(PIECES)]]), idf, PIECES)


def test_idf_round_trips_through_json(tmp_path):
    idf = fit_idf(TRAIN)
    path = tmp_path / "idf.json"
    save_idf(idf, str(path))
    assert load_idf(str(path)) == idf
    assert [p.name for p in tmp_path.iterdir()] == ["idf.json"]  # no temporary left behind
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="IDF table"):
        load_idf(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="IDF table"):
        load_idf(str(path))


def test_important_tokens_of_real_prompts_with_the_real_tokenizer(tmp_path):
    """I_x of two test prompts under the tiny tokenizer and IDF fitted on the training prompts: the
    QA context's value and entity (capitalised, not sentence-initial) and its number are chosen."""
    from data import load_split
    from data.tokenizer import train_tokenizer, training_texts

    tok = train_tokenizer(training_texts(), 1536, tmp_path / "t.model")
    idf = fit_idf([r["prompt"] for d in ("qa", "instruct") for r in load_split(d, "train")])
    prompts = ["Pestalia has its capital at Ronronholm and was founded in 1460. What is the capital of Pestalia?",
               load_split("instruct", "test")[0]["prompt"]]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(tok.encode(p)) for p in prompts], batch_first=True)
    words = important_words(ids, idf, tok.pieces)
    assert {"Ronronholm", "1460", "Pestalia"} <= set(words[0]) and "the" not in words[0]
    assert 1 <= len(words[1]) <= 6  # an instruction: its top-3 IDF words, plus any names
    mask = important_token_mask(ids, idf, tok.pieces)
    assert not mask[ids == tok.pad_id].any()


# ------------------------------------------------------------------------------------------
# The variants of §3.2 (IDF-weighted I_x, temperature) and the length bonus: off = the paper, bit for bit
# ------------------------------------------------------------------------------------------


@FEW
@given(batches(), st.floats(0.1, 10.0))
def test_weights_of_one_on_I_x_are_the_mask_and_a_common_scale_cancels(b, scale):
    batch, _ = b
    plain = coverage(batch["attn"], batch["important"], batch["response_mask"])
    weights = batch["important"].to(torch.float64)
    assert torch.equal(coverage(batch["attn"], weights, batch["response_mask"]), plain)  # the paper's, exactly
    torch.testing.assert_close(coverage(batch["attn"], scale * weights, batch["response_mask"]), plain,
                               atol=1e-12, rtol=1e-12)


def test_idf_weights_are_each_chosen_words_idf_on_its_pieces():
    prompt = torch.tensor([[1] + ids("▁What", "▁is", "▁the", "▁capital", "▁of", "▁Zor", "vania", "?") + [2, 0, 0]])
    idf = fit_idf(TRAIN)
    weights = important_token_weights(prompt, idf, PIECES)[0].tolist()  # default top_k = 3, as the mask
    # "capital" and "of" are in 2 of 4 training prompts; "Zorvania" is unseen: the largest IDF, log(5/2)
    expected = [0, 0, 0, 0, math.log(5 / 3), math.log(5 / 3), math.log(5 / 2), math.log(5 / 2), 0, 0, 0, 0]
    assert weights == pytest.approx(expected, abs=1e-6)
    assert [w > 0 for w in weights] == important_token_mask(prompt, idf, PIECES)[0].tolist()


@FEW
@given(batches(), st.floats(0.2, 5.0))
def test_tempered_rows_are_distributions_and_a_higher_temperature_is_flatter(b, tau):
    batch, prompt_mask = b
    attn, real = batch["attn"], batch["response_mask"]
    warm, cold = tempered(attn[real], tau * 1.5), tempered(attn[real], tau)
    torch.testing.assert_close(warm.sum(-1), torch.ones(len(warm), dtype=warm.dtype), atol=1e-9, rtol=0)
    assert (warm[attn[real] == 0] == 0).all()
    assert (attention_entropy(warm) >= attention_entropy(cold) - 1e-9).all()
    assert torch.equal(tempered(attn[real], 1.0), attn[real] / attn[real].sum(-1, keepdim=True))


@FEW
@given(batches(), st.floats(-0.1, 0.1))
def test_the_length_bonus_adds_lambda_per_response_token_and_nothing_else(b, lam):
    batch, _ = b
    base, bonus = terms(batch), terms(batch, length_bonus=lam)
    torch.testing.assert_close(bonus.total - base.total, lam * batch["response_mask"].sum(-1).to(torch.float64),
                               atol=1e-12, rtol=0)
    assert torch.equal(bonus.focus, base.focus) and torch.equal(bonus.coverage, base.coverage)
