"""model.py as a specification: attention is a distribution that never touches padding, the decoder
is causal, KV-cached sampling is exactly teacher forcing, and the presets have the sizes we claim."""
import copy
from dataclasses import replace

import pytest
import torch

from model import PRESETS, Transformer, additive_mask, attend, build, decoder_input

CFG = replace(PRESETS["tiny"], vocab_size=97, d_model=32, n_heads=4, d_kv=8, d_ff=64, n_enc_layers=2,
              n_dec_layers=3, max_len=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def prompts(lengths, S=None, seed=1):
    """Right-padded random prompts of the given real lengths: [B, S]."""
    g = torch.Generator().manual_seed(seed)
    S = S or max(lengths)
    ids = torch.randint(3, CFG.vocab_size, (len(lengths), S), generator=g)
    for b, n in enumerate(lengths):
        ids[b, n:] = CFG.pad_id
    return ids


def with_start(tokens):
    """The decoder's input for `tokens` plus one more position: logits[:, t] predicts tokens[:, t]."""
    return decoder_input(torch.cat([tokens, tokens[:, :1]], dim=1), CFG.pad_id)


def teacher_forced(model, src, rollout, capture_last):
    """Log-probs of the sampled tokens and Ā, recomputed in one forward pass."""
    logits, attn = model(src, with_start(rollout.tokens), capture_last=capture_last)
    logp = logits[:, :-1].log_softmax(-1).gather(2, rollout.tokens[..., None])[..., 0]
    return logp, attn[:, :-1]


def test_explicit_attention_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])[:, None, None, :]
    position = torch.randn(1, 3, 5, 7)
    for bias in (additive_mask(mask), position + additive_mask(mask), None):
        fused, _ = attend(q, k, v, bias)
        explicit, w = attend(q, k, v, bias, need_weights=True)
        torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=1e-5)
        if bias is not None:
            assert torch.all(w[1, :, :, 4:] == 0)  # masked keys: exactly zero weight
    q2 = torch.randn(2, 3, 7, 8)
    causal = additive_mask(torch.ones(7, 7, dtype=torch.bool).tril())
    fused, _ = attend(q2, k, v, causal)
    explicit, w = attend(q2, k, v, causal, need_weights=True)
    torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=1e-5)
    assert torch.all(w.triu(1) == 0)


def test_bf16_attention_on_the_cpu_is_the_fp32_softmax_within_bf16_rounding():
    """In bf16 on the CPU attend writes the softmax out (faster there than the fused kernel):
    the same attention as fp32 to bf16's precision, and masked keys still get exactly zero weight."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])[:, None, None, :]
    bias = torch.randn(1, 3, 5, 7) + additive_mask(mask)
    fp32, _ = attend(q, k, v, bias)
    out, none = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    assert none is None and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fp32, atol=0.05, rtol=0.05)
    _, w = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, need_weights=True)
    assert w.dtype == torch.float32 and torch.all(w[1, :, :, 4:] == 0)


def test_cross_attention_rows_sum_to_one_and_padding_gets_exactly_zero(model):
    src = prompts([6, 3, 1], S=8)
    tgt = with_start(torch.randint(3, CFG.vocab_size, (3, 5)))
    for last in (1, 2, 3):
        _, attn = model(src, tgt, capture_last=last)  # [B,T,S]
        torch.testing.assert_close(attn.sum(-1), torch.ones(3, 6))
        assert torch.all(attn[src[:, None, :].expand_as(attn) == CFG.pad_id] == 0)
    assert model(src, tgt)[1] is None


def test_decoder_is_causal(model):
    src = prompts([5, 7])
    tgt = with_start(torch.randint(3, CFG.vocab_size, (2, 6)))
    changed = tgt.clone()
    changed[:, 4] = (changed[:, 4] + 1) % CFG.vocab_size
    a, attn_a = model(src, tgt, capture_last=2)
    b, attn_b = model(src, changed, capture_last=2)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=0, rtol=0)
    torch.testing.assert_close(attn_a[:, :4], attn_b[:, :4], atol=0, rtol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("greedy", [True, False])
def test_kv_cached_generation_equals_teacher_forcing(model, greedy):
    src = prompts([7, 4, 2], S=9)
    torch.manual_seed(3)
    r = model.generate(src, num_samples=4, max_new_tokens=12, greedy=greedy, capture_last=2)
    assert r.tokens.shape == r.logprobs.shape == r.mask.shape == r.cross_attn.shape[:2]
    assert r.cross_attn.shape == (12, r.tokens.shape[1], 9)
    logp, attn = teacher_forced(model, src, r, capture_last=2)
    torch.testing.assert_close(logp[r.mask], r.logprobs[r.mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(attn[r.mask], r.cross_attn[r.mask], atol=1e-5, rtol=0)
    assert torch.all(r.cross_attn[~r.mask] == 0) and torch.all(r.logprobs[~r.mask] == 0)


def test_prompts_whose_samples_all_ended_leave_the_batch_without_changing_a_sample():
    """generate drops a prompt once its N samples have ended: the others' samples, log-probs and Ā
    stay those of teacher forcing, and every prompt gets the samples it gets alone, given the same
    random numbers."""
    torch.manual_seed(0)
    m = Transformer(CFG).eval()
    logits = m.logits
    m.logits = lambda h: logits(h) + 4.0 * (torch.arange(CFG.vocab_size) == CFG.eos_id)  # EOS likely: early ends
    src, N, T = prompts([7, 4, 2, 6, 5, 3, 8, 1], S=9), 3, 12
    u = torch.rand(len(src) * N, T, generator=torch.Generator().manual_seed(1))
    r = m.generate(src, num_samples=N, max_new_tokens=T, capture_last=2, uniforms=u)
    prompt_ends = r.mask.sum(1).view(-1, N).max(1).values
    assert (prompt_ends < r.tokens.shape[1] - 1).sum() >= 2  # a quarter of the prompts left before the end
    logp, attn = teacher_forced(m, src, r, capture_last=2)
    torch.testing.assert_close(logp[r.mask], r.logprobs[r.mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(attn[r.mask], r.cross_attn[r.mask], atol=1e-5, rtol=0)
    for b in range(len(src)):
        alone = m.generate(src[b : b + 1], num_samples=N, max_new_tokens=T, capture_last=2,
                           uniforms=u[b * N : b * N + N])
        mine = r.tokens[b * N : b * N + N]
        assert torch.equal(mine[:, : alone.tokens.shape[1]], alone.tokens)
        assert torch.all(mine[:, alone.tokens.shape[1] :] == CFG.pad_id)


@pytest.mark.parametrize("greedy", [True, False])
def test_static_shape_sampling_equals_eager_sampling(model, greedy):
    """generate(static=True) — every step the same shapes, for CUDA graphs — gives the samples, log-probs
    and Ā of the default path: the cache positions it also reads get exactly zero weight."""
    src, N, T = prompts([7, 4, 2], S=9), 4, 12
    u = torch.rand(len(src) * N, T, generator=torch.Generator().manual_seed(2))
    a = model.generate(src, num_samples=N, max_new_tokens=T, greedy=greedy, capture_last=2, uniforms=u)
    b = model.generate(src, num_samples=N, max_new_tokens=T, greedy=greedy, capture_last=2, uniforms=u, static=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.cross_attn, a.cross_attn, atol=1e-6, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_sampling_under_bf16_autocast_keeps_a_bf16_cache_and_distributions(model, static):
    """Under bf16 autocast the KV cache takes the dtype the key projections give (bf16): the static path,
    which writes it with index_copy_, then runs as the default path does (with an fp32 cache it
    raised), and both give log-probabilities ≤ 0 and rows of Ā that sum to 1."""
    src, N, T = prompts([7, 4, 2], S=9), 2, 6
    zeros = torch.zeros
    dtypes = []

    def recording_zeros(*shape, **kw):  # the cache is the one 6-d buffer generate allocates
        dtypes.extend([kw.get("dtype")] if len(shape) == 6 else [])
        return zeros(*shape, **kw)

    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "zeros", recording_zeros)
        r = model.generate(src, num_samples=N, max_new_tokens=T, capture_last=2, static=static)
    assert dtypes == [torch.bfloat16]
    assert torch.all(r.logprobs[r.mask] <= 0)
    torch.testing.assert_close(r.cross_attn[r.mask].sum(-1), torch.ones(int(r.mask.sum())), atol=1e-2, rtol=0)


@pytest.mark.slow  # compiling takes a minute on a CPU
def test_the_compiled_sampling_step_equals_the_eager_one(model):
    """compile_sampling (CUDA graphs on a GPU; on the CPU the same compiled graph without them)."""
    compiled = copy.deepcopy(model)
    compiled.compile_sampling()
    src, N, T = prompts([7, 4, 2], S=9), 2, 6
    u = torch.rand(len(src) * N, T, generator=torch.Generator().manual_seed(3))
    a = model.generate(src, num_samples=N, max_new_tokens=T, capture_last=2, uniforms=u, static=True)
    b = compiled.generate(src, num_samples=N, max_new_tokens=T, capture_last=2, uniforms=u)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.cross_attn, a.cross_attn, atol=1e-5, rtol=0)


def test_rollout_layout_eos_and_padding(model):
    """Rows b·N…b·N+N−1 are prompt b's samples; a sample ends at its first EOS, pad after it."""
    cfg = replace(CFG, eos_id=5)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    eos_logit = torch.zeros(cfg.vocab_size).index_fill(0, torch.tensor(cfg.eos_id), 3.0)
    m.logits = lambda h: eos_logit.expand(*h.shape[:-1], -1)  # logit 3 for EOS, 0 else: P(EOS) ≈ 0.17 per step
    src = prompts([5, 5])
    src[1] = src[0]
    r = m.generate(src, num_samples=3, max_new_tokens=10)
    lengths = r.mask.sum(1)
    assert lengths.min() < r.tokens.shape[1]
    for row, n in enumerate(lengths.tolist()):
        assert r.mask[row, :n].all() and not r.mask[row, n:].any()
        assert torch.all(r.tokens[row, n:] == cfg.pad_id)
        assert (r.tokens[row, : n - 1] != cfg.eos_id).all()
        assert r.tokens[row, n - 1] == cfg.eos_id or n == r.tokens.shape[1]
    assert not (r.tokens[r.mask] == cfg.pad_id).any()


def test_padded_batch_gives_each_sequence_its_result_alone(model):
    lengths = [8, 3, 5]
    src = prompts(lengths, S=10)
    tgt = with_start(torch.randint(3, CFG.vocab_size, (3, 6)))
    logits, attn = model(src, tgt, capture_last=2)
    greedy = model.generate(src, greedy=True, max_new_tokens=8)
    for b, n in enumerate(lengths):
        alone_logits, alone_attn = model(src[b : b + 1, :n], tgt[b : b + 1], capture_last=2)
        torch.testing.assert_close(logits[b : b + 1], alone_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn[b : b + 1, :, :n], alone_attn, atol=1e-6, rtol=1e-5)
        alone = model.generate(src[b : b + 1, :n], greedy=True, max_new_tokens=8)
        T = alone.tokens.shape[1]
        assert torch.equal(greedy.tokens[b, :T], alone.tokens[0])
        torch.testing.assert_close(greedy.cross_attn[b, :T, :n], alone.cross_attn[0], atol=1e-6, rtol=1e-5)


def test_samples_of_one_prompt_share_the_encoder_but_differ(model):
    src = prompts([6])
    torch.manual_seed(0)
    r = model.generate(src, num_samples=8, max_new_tokens=10, temperature=2.0)
    assert len({tuple(row.tolist()) for row in r.tokens}) > 1


def test_top_k_and_top_p_restrict_the_sampling_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    torch.manual_seed(0)
    tok, logp = Transformer.choose(logits, 1.0, 2, 1.0, False)
    assert set(tok.tolist()) == {0, 1}
    torch.testing.assert_close(logp.exp(), torch.tensor([0.5, 0.3])[tok] / 0.8)
    tok, logp = Transformer.choose(logits, 1.0, 0, 0.7, False)  # 0.5 < 0.7 ≤ 0.5 + 0.3
    assert set(tok.tolist()) == {0, 1}
    tok, _ = Transformer.choose(logits, 1.0, 0, 0.4, False)
    assert set(tok.tolist()) == {0}
    tok, logp = Transformer.choose(logits[:1], 1.0, 0, 1.0, True)
    assert tok.item() == 0 and abs(logp.item() - torch.log(torch.tensor(0.5)).item()) < 1e-6


def test_prompt_longer_than_the_model_reads_is_a_clear_error(model):
    with pytest.raises(ValueError, match="at most 16"):
        model.generate(prompts([17]))


def test_preset_parameter_counts_on_the_meta_device():
    counts = {}
    for size in PRESETS:
        with torch.device("meta"):
            counts[size] = build(size).num_parameters()
    assert counts["tiny"] <= 5_000_000
    assert 1.25e9 <= counts["1.3b"] <= 1.40e9
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["large"] < counts["1.3b"]
    with pytest.raises(ValueError, match="unknown size"):
        build("huge")


@pytest.mark.parametrize("seed", range(3))
def test_a_packed_decoder_pass_equals_the_padded_one_at_the_real_positions(seed):
    """The PPO update's packed pass (model.Packing): the same logits and the same gradients as the
    padded pass, up to float rounding — the padding it skips is never read by a real position."""
    torch.manual_seed(seed)
    model = Transformer(CFG).train()
    g = torch.Generator().manual_seed(seed)
    src = prompts([9, 5, 12], seed=seed)
    lengths = torch.randint(1, 11, (6,), generator=g)  # 2 responses per prompt, 1…10 tokens, T = 10
    mask = torch.arange(10) < lengths[:, None]
    tokens = torch.randint(3, CFG.vocab_size, (6, 10), generator=g).masked_fill(~mask, CFG.pad_id)
    dec_in = decoder_input(tokens, CFG.pad_id)
    weights = torch.randn(6, 10, CFG.vocab_size, generator=g)  # a loss that reads every real logit

    def loss_and_grads(logits_at_real):
        loss = (logits_at_real * weights[mask]).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return logits_at_real.detach(), grads

    dense_logits, dense_grads = loss_and_grads(model(src, dec_in)[0][mask])
    packed_logits, packed_grads = loss_and_grads(model(src, dec_in, tgt_mask=mask)[0])
    torch.testing.assert_close(packed_logits, dense_logits, atol=1e-5, rtol=1e-5)
    for p, d in zip(packed_grads, dense_grads):
        torch.testing.assert_close(p, d, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="packed"):
        model(src, dec_in, capture_last=1, tgt_mask=mask)
