"""The encoder–decoder Transformer of CAGSR (paper §3.1, §7.2), written out by hand.

An encoder reads the prompt x once; a decoder writes the response y token by token and, at every
step t and layer ℓ, attends to the prompt with a cross-attention distribution A_t^(ℓ) over the |x|
prompt tokens. CAGSR's reward is built from Ā, the mean of those distributions over the heads and the
last L' layers (§3.2), so this file's job beyond being a language model is to hand out Ā cheaply:

- one `Attention` module serves self- and cross-attention; it uses PyTorch's fused
  `scaled_dot_product_attention` unless the caller needs the weights, and only then computes the
  softmax explicitly;
- `generate` samples N responses per prompt with a KV cache, runs the encoder and the cross-attention
  key/value projections once per prompt (shared by its N samples, never copied), and records Ā of the
  last L' layers as a [B·N, T, S] tensor — never the full per-layer, per-head tuple.

Shapes: B prompts, N samples per prompt, S prompt length, T response length, H heads, D model width.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1536
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 768
    n_enc_layers: int = 2
    n_dec_layers: int = 3
    max_len: int = 64  # longest prompt and longest response, in tokens
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),  # ≈4.6M parameters: trains in minutes on 2 CPU cores
    "small": ModelConfig(vocab_size=4096, d_model=384, n_heads=6, d_ff=1536, n_enc_layers=4,
                         n_dec_layers=4, max_len=128),
    "base": ModelConfig(vocab_size=8192, d_model=768, n_heads=12, d_ff=3072, n_enc_layers=6,
                        n_dec_layers=6, max_len=256),
    "large": ModelConfig(vocab_size=16384, d_model=1024, n_heads=16, d_ff=4096, n_enc_layers=12,
                         n_dec_layers=12, max_len=256),
    "1.3b": ModelConfig(vocab_size=32128, d_model=2048, n_heads=16, d_ff=6144, n_enc_layers=12,
                        n_dec_layers=12, max_len=512),  # the paper's ≈1.3B model (§7.2)
}

NEG_INF = -1e9  # logit of tokens the policy may never emit (pad, bos); finite so 0·log 0 stays 0


def attend(q, k, v, mask=None, causal=False, need_weights=False):
    """softmax(q kᵀ / √d) v over the keys allowed by `mask` (True = may attend).

    q [B,H,Tq,d], k and v [B,H,Tk,d], mask broadcastable to [B,H,Tq,Tk]. With `need_weights` the
    softmax is written out and its weights [B,H,Tq,Tk] returned; otherwise the fused kernel runs.
    A masked key gets exp(−inf) = 0, i.e. exactly zero weight, on both paths.
    """
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal), None
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B,H,Tq,Tk]
    if causal:
        Tq, Tk = scores.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(dim=-1)  # fp32 even under bf16 autocast: Ā feeds the reward
    return weights.to(v.dtype) @ v, weights


class Attention(nn.Module):
    """Multi-head attention, for self-attention (keys from x) and cross-attention (keys from memory)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.d = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def split_heads(self, x):  # [B,T,D] -> [B,H,T,d]
        return x.view(x.shape[0], x.shape[1], self.h, self.d).transpose(1, 2)

    def keys_values(self, x):  # [B,T,D] -> k, v each [B,H,T,d]
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x, k, v, mask=None, causal=False, need_weights=False):
        """x [B,T,D] queries; k, v [B',H,Tk,d] with B = B'·N: the N consecutive query rows of one
        key row (the N samples of one prompt) share its keys without copying them."""
        B, T, D = x.shape
        n = B // k.shape[0]
        q = self.split_heads(self.q_proj(x))  # [B,H,T,d]
        if n > 1:  # fold the N samples into the query axis: [B'·N,H,T,d] -> [B',H,N·T,d]
            q = q.view(-1, n, self.h, T, self.d).transpose(1, 2).reshape(-1, self.h, n * T, self.d)
        out, w = attend(q, k, v, mask, causal, need_weights)
        if n > 1:  # unfold: [B',H,N·T,·] -> [B'·N,H,T,·]
            out = out.view(-1, self.h, n, T, self.d).transpose(1, 2).reshape(B, self.h, T, self.d)
            if w is not None:
                w = w.view(-1, self.h, n, T, w.shape[-1]).transpose(1, 2).reshape(B, self.h, T, -1)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D)), w


class FeedForward(nn.Sequential):
    def __init__(self, cfg: ModelConfig):
        super().__init__(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln2, self.ff = nn.LayerNorm(cfg.d_model), FeedForward(cfg)

    def forward(self, x, src_mask):  # x [B,S,D], src_mask [B,1,1,S]
        h = self.ln1(x)
        x = x + self.attn(h, *self.attn.keys_values(h), mask=src_mask)[0]
        return x + self.ff(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln2, self.cross_attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln3, self.ff = nn.LayerNorm(cfg.d_model), FeedForward(cfg)

    def forward(self, x, cross_kv, src_mask, need_weights=False, cache=None, t=0):
        """Pre-norm block on x [B·N,T,D]. cross_kv: the prompt's keys/values [B,H,S,d], once per
        prompt — or the encoder memory [B,S,D], projected here (inside forward, where FSDP has gathered
        this layer's weights). Teacher forcing (cache None) attends causally over x itself; sampling writes step t's
        keys/values into `cache` [2,B·N,H,T_max,d] and attends over steps 0…t.
        Returns the new x and the cross-attention weights [B·N,H,T,S] (or None)."""
        if isinstance(cross_kv, torch.Tensor):
            cross_kv = self.cross_attn.keys_values(cross_kv)
        h = self.ln1(x)
        k, v = self.self_attn.keys_values(h)
        if cache is not None:
            cache[0, :, :, t : t + 1], cache[1, :, :, t : t + 1] = k, v
            k, v = cache[0, :, :, : t + 1], cache[1, :, :, : t + 1]
        x = x + self.self_attn(h, k, v, causal=cache is None)[0]
        a, w = self.cross_attn(self.ln2(x), *cross_kv, mask=src_mask, need_weights=need_weights)
        x = x + a
        return x + self.ff(self.ln3(x)), w


@dataclass
class Rollout:
    """N sampled responses per prompt; row b·N + i is sample i of prompt b."""
    tokens: torch.Tensor  # [B·N, T] long: response without BOS, ending in EOS, then pad_id
    logprobs: torch.Tensor  # [B·N, T] log π of each sampled token under the sampling distribution
    mask: torch.Tensor  # [B·N, T] bool: True up to and including the EOS
    cross_attn: torch.Tensor | None  # [B·N, T, S] Ā of the last L' decoder layers (0 where masked)
    memory: torch.Tensor | None = None  # [B, S, D] encoder states, once per prompt (the value head reads them)
    src_mask: torch.Tensor | None = None  # [B, 1, 1, S] True = real prompt token


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by encoder, decoder and output
        # Learned positions, initialised at the token embeddings' scale. (Fixed sinusoids have norm
        # √(D/2) ≈ 11 against ≈ 0.3 for a token, drowning which token it is: the model then failed
        # to copy names from the prompt.)
        self.pos = nn.Embedding(cfg.max_len + 1, cfg.d_model)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        banned = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        banned[[cfg.pad_id, cfg.bos_id]] = True
        self.register_buffer("banned", banned, persistent=False)
        self.grad_checkpoint = False  # recompute layer activations in backward (runtime.Runtime sets it)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compile_teacher_forcing(self):
        """torch.compile the passes training runs (encoder, teacher-forced decoder). Sampling stays
        eager: its one-token steps change shape at every step and would recompile each time."""
        self.encode = torch.compile(self.encode)
        self.decoder_states = torch.compile(self.decoder_states)

    def run_layer(self, layer, *args, **kwargs):
        """layer(*args): with gradient checkpointing while training, its activations are not kept for
        backward but recomputed there — memory of one layer's input instead of all its intermediates."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    # ---- encoder: once per prompt -------------------------------------------------------------
    def encode(self, src_ids):
        """src_ids [B,S] -> memory [B,S,D] and src_mask [B,1,1,S] (True = real prompt token)."""
        if src_ids.shape[1] > self.cfg.max_len:
            raise ValueError(f"prompt has {src_ids.shape[1]} tokens; this model reads at most {self.cfg.max_len}")
        src_mask = (src_ids != self.cfg.pad_id)[:, None, None, :]
        x = self.embed(src_ids) + self.pos.weight[: src_ids.shape[1]]
        for layer in self.encoder:
            x = self.run_layer(layer, x, src_mask)
        return self.enc_norm(x), src_mask

    def logits(self, h):  # [.., D] -> [.., V]; pad and bos are never emitted
        return (self.dec_norm(h) @ self.embed.weight.T).masked_fill(self.banned, NEG_INF)

    def captured(self, layer_index: int, capture_last: int) -> bool:
        return layer_index >= self.cfg.n_dec_layers - capture_last

    # ---- teacher forcing ----------------------------------------------------------------------
    def decoder_states(self, memory, src_mask, tgt_ids, capture_last=0):
        """Teacher-forced decoder. memory [B,S,D]; tgt_ids [B·N,T] (N ≥ 1 targets per prompt, rows
        b·N…b·N+N−1 belong to prompt b). Returns the final states [B·N,T,D] (before the output norm)
        and Ā [B·N,T,S] of the last `capture_last` layers, or None."""
        T = tgt_ids.shape[1]
        if T > self.cfg.max_len + 1:
            raise ValueError(f"response has {T - 1} tokens; this model writes at most {self.cfg.max_len}")
        x = self.embed(tgt_ids) + self.pos.weight[:T]
        attn = []
        for i, layer in enumerate(self.decoder):
            need = self.captured(i, capture_last)
            x, w = self.run_layer(layer, x, memory, src_mask, need_weights=need)
            if need:
                attn.append(w.mean(dim=1))  # heads averaged: [B·N,T,S]
        return x, (torch.stack(attn).mean(dim=0) if attn else None)

    def decode(self, memory, src_mask, tgt_ids, capture_last=0):
        """decoder_states, then the tied output layer: logits [B·N,T,V] and Ā (or None)."""
        x, attn = self.decoder_states(memory, src_mask, tgt_ids, capture_last)
        return self.logits(x), attn

    def forward(self, src_ids, tgt_ids, capture_last=0):
        """src_ids [B,S], tgt_ids [B·N,T] starting with BOS -> logits [B·N,T,V] (logits[:, t] predicts
        the token after tgt_ids[:, t]) and Ā [B·N,T,S] of the last `capture_last` layers, or None."""
        memory, src_mask = self.encode(src_ids)
        return self.decode(memory, src_mask, tgt_ids, capture_last)

    # ---- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, src_ids, num_samples=1, max_new_tokens=None, temperature=1.0, top_k=0, top_p=1.0,
                 greedy=False, capture_last=1, uniforms=None) -> Rollout:
        """Sample `num_samples` responses per prompt (§5: "the model produces N diverse responses").

        The encoder and each layer's cross-attention keys/values run once per prompt; the decoder's own
        keys/values go into a preallocated cache, so step t costs one token's work, not t tokens'.
        `uniforms` [B·N, ≥T] in [0,1) fixes the random numbers of sampling (row r, step t uses
        uniforms[r, t]): a distributed run slices them from one global draw so that a sample does not
        depend on which rank drew it. Without them each step draws from torch's global generator.
        """
        cfg, N = self.cfg, num_samples
        T_max = min(max_new_tokens or cfg.max_len, cfg.max_len)
        memory, src_mask = self.encode(src_ids)  # [B,S,D]
        cross_kv = [layer.cross_attn.keys_values(memory) for layer in self.decoder]  # [B,H,S,d] each
        BN, S, dev = src_ids.shape[0] * N, src_ids.shape[1], src_ids.device
        cache = torch.zeros(len(self.decoder), 2, BN, cfg.n_heads, T_max, cfg.head_dim, device=dev,
                            dtype=memory.dtype)
        tokens = torch.full((BN, T_max), cfg.pad_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(BN, T_max, device=dev)
        mask = torch.zeros(BN, T_max, dtype=torch.bool, device=dev)
        attn = torch.zeros(BN, T_max, S, device=dev) if capture_last else None
        done = torch.zeros(BN, dtype=torch.bool, device=dev)
        prev = torch.full((BN,), cfg.bos_id, dtype=torch.long, device=dev)
        for t in range(T_max):
            x = self.embed(prev)[:, None] + self.pos.weight[t]  # [B·N,1,D]
            step_attn = []
            for i, layer in enumerate(self.decoder):
                need = self.captured(i, capture_last)
                x, w = layer(x, cross_kv[i], src_mask, need_weights=need, cache=cache[i], t=t)
                if need:
                    step_attn.append(w[:, :, 0].mean(dim=1))  # [B·N,S]
            u = uniforms[:, t : t + 1] if uniforms is not None else None
            tok, logp = self.choose(self.logits(x[:, 0]).float(), temperature, top_k, top_p, greedy, u)
            live = ~done
            tokens[:, t] = torch.where(live, tok, cfg.pad_id)
            logprobs[:, t] = torch.where(live, logp, 0.0)
            mask[:, t] = live
            if attn is not None:
                attn[:, t] = torch.stack(step_attn).mean(dim=0) * live[:, None]
            done = done | (tok == cfg.eos_id)
            prev = tokens[:, t]
            if done.all():
                break
        T = int(mask.sum(dim=1).max())
        return Rollout(tokens[:, :T], logprobs[:, :T], mask[:, :T], attn[:, :T] if attn is not None else None,
                       memory, src_mask)

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
