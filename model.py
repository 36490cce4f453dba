"""The encoder–decoder Transformer of CAGSR (paper §3.1, §7.2): T5, written out by hand.

An encoder reads the prompt x once; a decoder writes the response y token by token and, at every
step t and layer ℓ, attends to the prompt with a cross-attention distribution A_t^(ℓ) over the |x|
prompt tokens. CAGSR's reward is built from Ā, the mean of those distributions over the heads and the
last L' layers (§3.2).

The architecture is T5's (Raffel et al. 2020), so that published T5, Flan-T5 and mT5 checkpoints load
into it as a plain weight copy (hf.py): RMS layer norm, pre-norm residual blocks, projections without
bias, a learned relative-position bias instead of position embeddings, no 1/√d in the attention scores,
a ReLU (T5 v1.0) or gated-GELU (v1.1, Flan-T5, mT5) feed-forward, and an output layer that is either the
embedding (v1.0, with a d_model^-0.5 rescale) or its own `lm_head`. Beyond being a language model this
file's job is to hand out Ā cheaply:

- one `Attention` module serves self- and cross-attention; it uses PyTorch's fused
  `scaled_dot_product_attention` unless the caller needs the weights, and only then computes the
  softmax explicitly;
- `generate` samples N responses per prompt with a KV cache, runs the encoder and the cross-attention
  key/value projections once per prompt (shared by its N samples, never copied), and records Ā of the
  last L' layers as a [B·N, T, S] tensor — never the full per-layer, per-head tuple.

Token ids are T5's: pad 0 (also the decoder's start token), eos 1; there is no BOS.
Shapes: B prompts, N samples per prompt, S prompt length, T response length, H heads, d head width,
D model width.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import hf


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1536
    d_model: int = 256
    n_heads: int = 4
    d_kv: int = 64  # width of one head; n_heads·d_kv need not equal d_model (mT5-small: 6·64 vs 512)
    d_ff: int = 512
    n_enc_layers: int = 2
    n_dec_layers: int = 3
    gated: bool = True  # feed-forward: gated GELU (T5 v1.1, Flan-T5, mT5) or ReLU (T5 v1.0)
    tied: bool = False  # output layer: the embedding matrix (v1.0) or a separate lm_head (v1.1 and later)
    scale_output: bool = False  # multiply the decoder's output by d_model^-0.5 before the output layer (v1.0)
    num_buckets: int = 32  # relative-position buckets (T5's relative_attention_num_buckets)
    max_distance: int = 128  # distances from here on share the last bucket
    eps: float = 1e-6  # RMS norm epsilon
    max_len: int = 64  # longest prompt and longest response, in tokens (T5 has no limit; our buffers do)
    pad_id: int = 0  # also the decoder's start token, as in T5
    eos_id: int = 1

    @property
    def inner_dim(self) -> int:  # width of the concatenated heads
        return self.n_heads * self.d_kv


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),  # ≈4.9M parameters: trains from scratch in minutes on 2 CPU cores
    "small": ModelConfig(vocab_size=4096, d_model=384, n_heads=6, d_ff=1024, n_enc_layers=4, n_dec_layers=4,
                         max_len=128),
    "base": ModelConfig(vocab_size=8192, d_model=768, n_heads=12, d_ff=2048, n_enc_layers=6, n_dec_layers=6,
                        max_len=256),
    "large": ModelConfig(vocab_size=16384, d_model=1024, n_heads=16, d_ff=2816, n_enc_layers=12,
                         n_dec_layers=12, max_len=256),
    "1.3b": ModelConfig(vocab_size=32128, d_model=2048, n_heads=32, d_ff=4096, n_enc_layers=12,
                        n_dec_layers=12, max_len=512),  # the paper's ≈1.3B model (§7.2)
}

NEG_INF = -1e9  # logit of tokens the policy may never emit (pad); finite so 0·log 0 stays 0


class RMSNorm(nn.Module):
    """T5's layer norm: y = w ⊙ x / √(mean(x²) + ε) — no mean subtracted, no bias, computed in fp32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of r = key position − query position.

    Bidirectional (encoder): half the buckets for r > 0, half for r ≤ 0; causal (decoder): only r ≤ 0
    counts (later keys are masked anyway). Of a side's n buckets, distances |r| < n/2 get one bucket
    each; larger ones share n/2 logarithmically spaced buckets up to max_distance, beyond which all
    fall into the last: bucket = n/2 + ⌊log(|r| / (n/2)) / log(max_distance / (n/2)) · n/2⌋.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    log_bucket = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """One learned scalar per head and bucket, added to the attention scores. One instance per stack:
    computed once per forward pass and shared by all its layers (cross-attention has none)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.cfg, self.bidirectional = cfg, bidirectional
        self.bias = nn.Embedding(cfg.num_buckets, cfg.n_heads)

    def forward(self, n_queries: int, n_keys: int):  # -> [1,H,Tq,Tk]
        dev = self.bias.weight.device
        r = torch.arange(n_keys, device=dev)[None, :] - torch.arange(n_queries, device=dev)[:, None]
        b = relative_position_bucket(r, self.bidirectional, self.cfg.num_buckets, self.cfg.max_distance)
        return self.bias(b).permute(2, 0, 1)[None]


def additive_mask(mask):
    """Boolean mask (True = may attend) -> 0 / −inf to add to the scores."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


def attend(q, k, v, bias=None, need_weights=False):
    """softmax(q kᵀ + bias) v — without T5's missing 1/√d: its initialisation folds the scale into q.

    q [B,H,Tq,d], k and v [B,H,Tk,d], bias broadcastable to [B,H,Tq,Tk]: position bias plus −inf on the
    keys a query may not see. Unless the caller needs the weights, PyTorch's fused kernel runs —
    except in bf16 on the CPU, where the fused kernel, in bf16 or on q, k, v cast to fp32, was 1.4–4.8×
    slower than the explicit softmax at our sizes (`bench.py --only attention`, two days' runs on an
    AMD EPYC, Zen 4; the README has both). The explicit softmax runs in fp32 even under bf16 autocast
    (Ā feeds the reward); with `need_weights` its weights [B,H,Tq,Tk] are returned. A −inf key gets
    exp(−inf) = 0, i.e. exactly zero weight, on both paths.
    """
    if not need_weights and not (q.dtype == torch.bfloat16 and q.device.type == "cpu"):
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0), None
    scores = q @ k.transpose(-1, -2)  # [B,H,Tq,Tk]
    if bias is not None:
        scores = scores + bias
    weights = scores.float().softmax(dim=-1)
    return weights.to(v.dtype) @ v, (weights if need_weights else None)


class Packing:
    """The real positions of a padded batch [R,T], for running the per-token work on them alone.

    Every projection, norm and feed-forward of a Transformer acts on each token by itself; only
    attention needs the [R,T] layout. A teacher-forced PPO batch is mostly padding (responses of ~18
    tokens padded to the longest, 48), so the decoder keeps its states packed, [n,D] over the n real
    positions, and attention unpacks its queries, keys and values into [R,T] (zeros at the padding)
    and packs its output back. In the decoder each row's real positions must be a prefix (a
    response, then pad): then a real query's causal window t' ≤ t holds only real keys, and the
    padding is never read; in the encoder the padding mask keeps it unread."""

    def __init__(self, mask):  # mask [R,T] bool, True = real position
        self.shape = mask.shape
        self.index = mask.reshape(-1).nonzero()[:, 0]  # [n] row-major: row r, step t at r·T + t

    def pack(self, x):  # [R,T,F] -> [n,F]
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x):  # [n,F] -> [R,T,F], zeros at the padding
        return x.new_zeros(self.shape.numel(), x.shape[-1]).index_copy(0, self.index, x).view(*self.shape, -1)


class Attention(nn.Module):
    """Multi-head attention, for self-attention (keys from x) and cross-attention (keys from memory).
    q, k, v, o are T5's names; none has a bias. x may be packed (see Packing): [n,D] with `packing`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.d = cfg.n_heads, cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, cfg.inner_dim, bias=False) for _ in range(3))
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)

    def split_heads(self, x):  # [B,T,H·d] -> [B,H,T,d]
        return x.view(x.shape[0], x.shape[1], self.h, self.d).transpose(1, 2)

    def keys_values(self, x, packing=None):  # [B,T,D] (or packed [n,D]) -> k, v each [B,H,T,d]
        k, v = self.k(x), self.v(x)
        if packing is not None:
            k, v = packing.unpack(k), packing.unpack(v)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x, k, v, bias=None, need_weights=False, packing=None):
        """x [B,T,D] queries (or packed [n,D] with `packing`); k, v [B',H,Tk,d] with B = B'·N: the N
        consecutive query rows of one key row (the N samples of one prompt) share its keys without
        copying them. The output has x's layout."""
        q = self.q(x)
        if packing is not None:
            q = packing.unpack(q)
        B, T, _ = q.shape
        n = B // k.shape[0]
        q = self.split_heads(q)  # [B,H,T,d]
        if n > 1:  # fold the N samples into the query axis: [B'·N,H,T,d] -> [B',H,N·T,d]
            q = q.view(-1, n, self.h, T, self.d).transpose(1, 2).reshape(-1, self.h, n * T, self.d)
        out, w = attend(q, k, v, bias, need_weights)
        if n > 1:  # unfold: [B',H,N·T,·] -> [B'·N,H,T,·]
            out = out.view(-1, self.h, n, T, self.d).transpose(1, 2).reshape(B, self.h, T, self.d)
            if w is not None:
                w = w.view(-1, self.h, n, T, w.shape[-1]).transpose(1, 2).reshape(B, self.h, T, -1)
        out = out.transpose(1, 2).reshape(B, T, self.h * self.d)
        return self.o(out if packing is None else packing.pack(out)), w


class FeedForward(nn.Module):
    """wo(relu(wi x)) for T5 v1.0; wo(gelu(wi_0 x) ⊙ wi_1 x) with tanh-approximated GELU for v1.1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        if self.gated:
            return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))
        return self.wo(F.relu(self.wi(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn = RMSNorm(cfg.d_model, cfg.eps), Attention(cfg)
        self.ln2, self.ff = RMSNorm(cfg.d_model, cfg.eps), FeedForward(cfg)

    def forward(self, x, bias, packing=None):  # x [B,S,D] or packed; bias [B,H,S,S]: position + padding
        h = self.ln1(x)
        x = x + self.attn(h, *self.attn.keys_values(h, packing), bias=bias, packing=packing)[0]
        return x + self.ff(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.self_attn = RMSNorm(cfg.d_model, cfg.eps), Attention(cfg)
        self.ln2, self.cross_attn = RMSNorm(cfg.d_model, cfg.eps), Attention(cfg)
        self.ln3, self.ff = RMSNorm(cfg.d_model, cfg.eps), FeedForward(cfg)

    def forward(self, x, cross_kv, self_bias, cross_bias, need_weights=False, cache=None, t=0, packing=None):
        """Pre-norm block on x [B·N,T,D] (or packed [n,D] with `packing`). cross_kv: the prompt's
        keys/values [B,H,S,d], once per prompt — or the encoder memory [B,S,D], projected here (inside
        forward, where FSDP has gathered this layer's weights). self_bias: position bias plus causal
        mask for x's queries; cross_bias [B,1,1,S]: the prompt's padding. Teacher forcing (cache None)
        attends over x itself; sampling writes step t's keys/values into `cache` [2,B·N,H,T_max,d] and
        attends over steps 0…t (t an int), or over all T_max steps, the later ones masked by self_bias
        (t a 1-element LongTensor: the same shapes at every step).
        Returns the new x and the cross-attention weights [B·N,H,T,S] (or None; not 0 at packed-out
        padding)."""
        if isinstance(cross_kv, torch.Tensor):
            cross_kv = self.cross_attn.keys_values(cross_kv)
        h = self.ln1(x)
        k, v = self.self_attn.keys_values(h, packing)
        if cache is not None and torch.is_tensor(t):  # static shapes: write row t, read all T_max rows
            cache[0].index_copy_(2, t, k)
            cache[1].index_copy_(2, t, v)
            k, v = cache[0], cache[1]
        elif cache is not None:
            cache[0, :, :, t : t + 1], cache[1, :, :, t : t + 1] = k, v
            k, v = cache[0, :, :, : t + 1], cache[1, :, :, : t + 1]
        x = x + self.self_attn(h, k, v, bias=self_bias, packing=packing)[0]
        a, w = self.cross_attn(self.ln2(x), *cross_kv, bias=cross_bias, need_weights=need_weights,
                               packing=packing)
        x = x + a
        return x + self.ff(self.ln3(x)), w


@dataclass
class Rollout:
    """N sampled responses per prompt; row b·N + i is sample i of prompt b."""
    tokens: torch.Tensor  # [B·N, T] long: the response, ending in EOS, then pad_id
    logprobs: torch.Tensor  # [B·N, T] log π of each sampled token under the sampling distribution
    mask: torch.Tensor  # [B·N, T] bool: True up to and including the EOS
    cross_attn: torch.Tensor | None  # [B·N, T, S] Ā of the last L' decoder layers (0 where masked)
    memory: torch.Tensor | None = None  # [B, S, D] encoder states, once per prompt (the value head reads them)
    src_mask: torch.Tensor | None = None  # [B, 1, 1, S] True = real prompt token


def banned_tokens(cfg: ModelConfig):
    """[V] bool: pad, the decoder's start token and what follows EOS, is never a choice."""
    return torch.arange(cfg.vocab_size) == cfg.pad_id


def decoder_input(tokens, start_id: int):
    """T5's "shift right": [start, y_1, …, y_{T−1}] — the decoder reads y_<t to predict y_t."""
    return torch.cat([torch.full_like(tokens[:, :1], start_id), tokens[:, :-1]], dim=1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by encoder and decoder (T5's `shared`)
        self.enc_pos = RelativePositionBias(cfg, bidirectional=True)
        self.dec_pos = RelativePositionBias(cfg, bidirectional=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec_layers))
        self.enc_norm, self.dec_norm = RMSNorm(cfg.d_model, cfg.eps), RMSNorm(cfg.d_model, cfg.eps)
        self.lm_head = None if cfg.tied else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("banned", banned_tokens(cfg), persistent=False)
        self.grad_checkpoint = False  # recompute layer activations in backward (runtime.Runtime sets it)
        self.sampling_step = None  # a compiled decode_step (compile_sampling): generate then uses static shapes
        self.apply(self._init)

    def _init(self, m):
        """T5's initialisation: every matrix N(0, 1/fan-in), the query's divided by d as well — the 1/√d
        that T5 leaves out of the scores; token embeddings N(0, 1); position biases N(0, 1/D). An untied
        lm_head follows the fan-in rule, N(0, 1/D), so its logits start at unit scale like the tied
        head's rescaled ones (Hugging Face draws it N(0, 1): logits of std √D at the first step)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
        elif isinstance(m, Attention):  # after its q, k, v, o (apply visits children first)
            with torch.no_grad():
                m.q.weight.div_(math.sqrt(m.d))
        elif isinstance(m, RelativePositionBias):
            nn.init.normal_(m.bias.weight, std=self.cfg.d_model ** -0.5)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)

    @classmethod
    def from_pretrained(cls, folder) -> "Transformer":
        """A local Hugging Face T5-family checkpoint folder (config.json and the weights, see hf.py) as
        our model, in fp32. Built on the meta device, so the weights are allocated once, as loaded."""
        fields, weights = hf.read_checkpoint(folder)
        with torch.device("meta"):
            model = cls(ModelConfig(**fields))
        hf.check_weights(weights, model.state_dict(), folder)
        model.load_state_dict(weights, assign=True)
        model.banned = banned_tokens(model.cfg)  # the one buffer not in the checkpoint
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compile_teacher_forcing(self):
        """torch.compile the passes training runs (encoder, teacher-forced decoder). Sampling's
        one-token steps change shape at every step and would recompile each time: see compile_sampling."""
        self.encode = torch.compile(self.encode)
        self.decoder_states = torch.compile(self.decoder_states)

    def compile_sampling(self):
        """Sampling with static shapes, its step compiled with CUDA graphs (torch.compile,
        mode="reduce-overhead"): a GPU replays one graph per token instead of launching every
        operation from Python. Not for the CPU, where the compiled step of the tiny preset ran several
        times slower than eager in a trial (and took a minute to compile)."""
        self.sampling_step = torch.compile(self.decode_step, mode="reduce-overhead", dynamic=False)

    def run_layer(self, layer, *args, **kwargs):
        """layer(*args): with gradient checkpointing while training, its activations are not kept for
        backward but recomputed there — memory of one layer's input instead of all its intermediates."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    # ---- encoder: once per prompt -------------------------------------------------------------
    def encode(self, src_ids, packed=False):
        """src_ids [B,S] -> memory [B,S,D] and src_mask [B,1,1,S] (True = real prompt token). `packed`:
        the per-token work runs on the real prompt tokens only (Packing; the padding mask keeps every
        query off the padded keys), and memory is 0 at the padding."""
        S = src_ids.shape[1]
        if S > self.cfg.max_len:
            raise ValueError(f"prompt has {S} tokens; this model reads at most {self.cfg.max_len}")
        src_mask = (src_ids != self.cfg.pad_id)[:, None, None, :]
        bias = self.enc_pos(S, S) + additive_mask(src_mask)  # [B,H,S,S], once for all layers
        packing = Packing(src_mask[:, 0, 0]) if packed else None
        x = self.embed(src_ids if packing is None else src_ids[src_mask[:, 0, 0]])
        for layer in self.encoder:
            x = self.run_layer(layer, x, bias, packing=packing)
        x = self.enc_norm(x)
        return (x if packing is None else packing.unpack(x)), src_mask

    def logits(self, h):
        """Final decoder states [..,D] (before the output norm) -> logits [..,V]; pad is never emitted."""
        h = self.dec_norm(h)
        if self.cfg.scale_output:
            h = h * self.cfg.d_model ** -0.5
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return (h @ weight.T).masked_fill(self.banned, NEG_INF)

    def captured(self, layer_index: int, capture_last: int) -> bool:
        return layer_index >= self.cfg.n_dec_layers - capture_last

    def self_bias(self, T: int):
        """Decoder self-attention's position bias plus causal mask for T positions: [1,H,T,T]."""
        causal = torch.ones(T, T, dtype=torch.bool, device=self.embed.weight.device).tril()
        return self.dec_pos(T, T) + additive_mask(causal)

    # ---- teacher forcing ----------------------------------------------------------------------
    def decoder_states(self, memory, src_mask, tgt_ids, capture_last=0, tgt_mask=None):
        """Teacher-forced decoder. memory [B,S,D]; tgt_ids [B·N,T] (N ≥ 1 targets per prompt, rows
        b·N…b·N+N−1 belong to prompt b). Returns the final states [B·N,T,D] (before the output norm)
        and Ā [B·N,T,S] of the last `capture_last` layers, or None. With tgt_mask [B·N,T] (True = real
        position, a prefix of each row) the decoder runs packed (Packing) and returns the states of
        the real positions alone, [n,D] in row-major order — the same numbers up to float rounding."""
        T = tgt_ids.shape[1]
        if T > self.cfg.max_len + 1:
            raise ValueError(f"response has {T - 1} tokens; this model writes at most {self.cfg.max_len}")
        if tgt_mask is not None and capture_last:
            raise ValueError("a packed decoder pass does not capture Ā")
        packing = None if tgt_mask is None else Packing(tgt_mask)
        self_bias, cross_bias = self.self_bias(T), additive_mask(src_mask)
        x = self.embed(tgt_ids if packing is None else tgt_ids[tgt_mask])
        attn = []
        for i, layer in enumerate(self.decoder):
            need = self.captured(i, capture_last)
            x, w = self.run_layer(layer, x, memory, self_bias, cross_bias, need_weights=need, packing=packing)
            if need:
                attn.append(w.mean(dim=1))  # heads averaged: [B·N,T,S]
        return x, (torch.stack(attn).mean(dim=0) if attn else None)

    def decode(self, memory, src_mask, tgt_ids, capture_last=0, tgt_mask=None):
        """decoder_states, then the output layer: logits [B·N,T,V] (packed [n,V] with tgt_mask) and Ā
        (or None)."""
        x, attn = self.decoder_states(memory, src_mask, tgt_ids, capture_last, tgt_mask)
        return self.logits(x), attn

    def forward(self, src_ids, tgt_ids, capture_last=0, tgt_mask=None):
        """src_ids [B,S], tgt_ids [B·N,T] = decoder_input(response) -> logits [B·N,T,V] (logits[:, t]
        predicts the token after tgt_ids[:, t]; with tgt_mask the pass is packed, encoder and decoder,
        and the logits are those of the real positions, [n,V]) and Ā [B·N,T,S] of the last
        `capture_last` layers, or None."""
        memory, src_mask = self.encode(src_ids, packed=tgt_mask is not None)
        return self.decode(memory, src_mask, tgt_ids, capture_last, tgt_mask)

    # ---- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, src_ids, num_samples=1, max_new_tokens=None, temperature=1.0, top_k=0, top_p=1.0,
                 greedy=False, capture_last=1, uniforms=None, static=False) -> Rollout:
        """Sample `num_samples` responses per prompt (§5: "the model produces N diverse responses").

        The encoder and each layer's cross-attention keys/values run once per prompt; the decoder's own
        keys/values go into a preallocated cache, so step t costs one token's work, not t tokens'.
        Once a quarter of the prompts still sampled have all N responses ended, they are dropped from
        the batch, so late steps cost only the long answers' work — unless `static` (or a compiled
        sampling_step): then every step has the same shapes (decode_step), as CUDA graphs need.
        `uniforms` [B·N, ≥T] in [0,1) fixes the random numbers of sampling (row r, step t uses
        uniforms[r, t]): a distributed run slices them from one global draw so that a sample does not
        depend on which rank drew it. Without them each step draws from torch's global generator.
        """
        cfg, N = self.cfg, num_samples
        T_max = min(max_new_tokens or cfg.max_len, cfg.max_len)
        memory, src_mask = self.encode(src_ids)  # [B,S,D]
        cross_kv = [layer.cross_attn.keys_values(memory) for layer in self.decoder]  # [B,H,S,d] each
        self_bias, cross_bias = self.self_bias(T_max), additive_mask(src_mask)  # step t reads row t
        BN, S, dev = src_ids.shape[0] * N, src_ids.shape[1], src_ids.device
        # the cache holds keys/values in the dtype the projections give them (bf16 under autocast, where
        # the residual stream stays fp32): a wider cache would cast all of it back at every step
        cache = torch.zeros(len(self.decoder), 2, BN, cfg.n_heads, T_max, cfg.d_kv, device=dev,
                            dtype=cross_kv[0][0].dtype)
        tokens = torch.full((BN, T_max), cfg.pad_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(BN, T_max, device=dev)
        mask = torch.zeros(BN, T_max, dtype=torch.bool, device=dev)
        attn = torch.zeros(BN, T_max, S, device=dev) if capture_last else None
        rows = torch.arange(BN, device=dev)  # the rows still sampled: whole prompts, their N rows together
        done = torch.zeros(BN, dtype=torch.bool, device=dev)  # per row of `rows`
        prev = torch.full((BN,), cfg.pad_id, dtype=torch.long, device=dev)  # the decoder start token
        static = static or self.sampling_step is not None
        step = self.sampling_step or self.decode_step
        steps = torch.arange(T_max, device=dev)  # static shapes: step t is the 1-element tensor steps[t:t+1]
        for t in range(T_max):
            logits, step_attn = step(prev, steps[t : t + 1] if static else t, cross_kv, self_bias, cross_bias,
                                     cache, capture_last)
            if uniforms is not None:
                u = uniforms[rows, t : t + 1]
            else:  # one number per row of the whole batch, as without dropping: the same samples
                u = None if greedy else torch.rand(BN, 1, device=dev)[rows]
            tok, logp = self.choose(logits, temperature, top_k, top_p, greedy, u)
            live = ~done
            tokens[rows, t] = prev = torch.where(live, tok, cfg.pad_id)
            logprobs[rows, t] = torch.where(live, logp, 0.0)
            mask[rows, t] = live
            if attn is not None:
                attn[rows, t] = step_attn * live[:, None]
            done = done | (tok == cfg.eos_id)
            if done.all():
                break
            finished = done.view(-1, N).all(dim=1)  # prompts whose N samples have all ended
            if not static and 4 * finished.sum() >= len(finished):  # a quarter of them: drop them
                keep = (~finished).nonzero()[:, 0]
                keep_rows = (keep[:, None] * N + torch.arange(N, device=dev)).reshape(-1)
                cross_kv = [(k[keep], v[keep]) for k, v in cross_kv]
                cross_bias, cache = cross_bias[keep], cache[:, :, keep_rows]
                rows, done, prev = rows[keep_rows], done[keep_rows], prev[keep_rows]
        T = int(mask.sum(dim=1).max())
        return Rollout(tokens[:, :T], logprobs[:, :T], mask[:, :T], attn[:, :T] if attn is not None else None,
                       memory, src_mask)

    def decode_step(self, prev, t, cross_kv, self_bias, cross_bias, cache, capture_last):
        """One sampling step of the decoder: the previous tokens prev [R] -> logits [R,V] in fp32 and
        the step's Ā [R,S] of the last `capture_last` layers (or None). t: the step, an int (attend over
        the cache's first t+1 positions) or a 1-element LongTensor (static shapes: all T_max positions,
        row t of self_bias masking the later ones)."""
        x = self.embed(prev)[:, None]  # [R,1,D]
        step_bias = self_bias.index_select(2, t) if torch.is_tensor(t) else self_bias[:, :, t : t + 1, : t + 1]
        step_attn = []
        for i, layer in enumerate(self.decoder):
            need = self.captured(i, capture_last)
            x, w = layer(x, cross_kv[i], step_bias, cross_bias, need_weights=need, cache=cache[i], t=t)
            if need:
                step_attn.append(w[:, :, 0].mean(dim=1))  # [R,S]
        return self.logits(x[:, 0]).float(), (torch.stack(step_attn).mean(dim=0) if step_attn else None)

    @staticmethod
    def choose(logits, temperature, top_k, top_p, greedy, u=None):
        """One token per row from logits [B,V]: argmax, or a sample from softmax(logits/temperature)
        restricted to the top-k tokens and to the smallest set whose probability reaches top_p.
        u [B,1]: the uniform random numbers to use (default: drawn now).
        Returns the tokens [B] and their log-probabilities under that sampling distribution."""
        if greedy:
            logp = logits.log_softmax(dim=-1)
            tok = logp.argmax(dim=-1)
            return tok, logp.gather(1, tok[:, None])[:, 0]
        logits = logits / temperature
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens: drop once ≥ top_p
            drop = torch.zeros_like(before, dtype=torch.bool).scatter(1, order, before >= top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        logp = logits.log_softmax(dim=-1)
        # Inverse-CDF sampling: one uniform number per row. torch.multinomial draws one per vocabulary
        # entry and was a fifth of the sampling time (bench.py). right=True never picks a p = 0 token.
        cdf = logp.exp().cumsum(dim=-1)  # [B,V]
        u = (torch.rand(cdf.shape[0], 1, device=cdf.device) if u is None else u) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[1] - 1)
        return tok, logp.gather(1, tok[:, None])[:, 0]


def build(size: str, **overrides) -> Transformer:
    """The model of a named preset, with optional config overrides (e.g. vocab_size=...)."""
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(PRESETS)}")
    return Transformer(replace(PRESETS[size], **overrides))
