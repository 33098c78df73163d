"""A gpt-fast-style decoder (pytorch-labs/gpt-fast `model.py`, reduced): RMSNorm, RoPE, SwiGLU,
grouped-query attention over a `KVCache` module whose K/V are registered buffers.

`ModelArgs.write` picks how the cache is written:
    "index_put": k_cache[:, :, input_pos] = k            (gpt-fast; a position tensor)
    "slice":     k_cache[:, :, start:start + T] = k      (copy_ into a slice; `start` a Python int)
`ModelArgs.gqa` picks how the KV heads reach the query heads:
    "enable_gqa":         SDPA(..., enable_gqa=True)
    "repeat_interleave":  k.repeat_interleave(n_head // n_local_heads, dim=1)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_local_heads: int = 2     # KV heads (1: multi-query attention)
    dim: int = 64
    intermediate_size: int = 128
    block_size: int = 256      # longest sequence the causal mask covers
    rope_base: float = 10000.0
    write: str = "index_put"
    gqa: str = "enable_gqa"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class KVCache(nn.Module):
    def __init__(self, batch: int, max_seq: int, heads: int, head_dim: int, write: str, dtype=torch.float32):
        super().__init__()
        shape = (batch, heads, max_seq, head_dim)
        self.write = write
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor):
        k_out, v_out = self.k_cache, self.v_cache
        if self.write == "index_put":
            k_out[:, :, input_pos] = k
            v_out[:, :, input_pos] = v
        else:
            k_out[:, :, start:start + k.shape[2]] = k
            v_out[:, :, start:start + v.shape[2]] = v
        return k_out, v_out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; freqs [T, D/2, 2] (cos, sin) of each position."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs = freqs.view(1, pairs.size(1), 1, pairs.size(3), 2)
    out = torch.stack([pairs[..., 0] * freqs[..., 0] - pairs[..., 1] * freqs[..., 1],
                       pairs[..., 1] * freqs[..., 0] + pairs[..., 0] * freqs[..., 1]], -1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        kv_dim = args.n_local_heads * args.head_dim
        self.wqkv = nn.Linear(args.dim, args.dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs, mask, input_pos, start):
        a = self.args
        b, t, _ = x.shape
        kv_dim = a.n_local_heads * a.head_dim
        q, k, v = self.wqkv(x).split([a.dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(b, t, a.n_head, a.head_dim), freqs)
        k = apply_rope(k.view(b, t, a.n_local_heads, a.head_dim), freqs)
        v = v.view(b, t, a.n_local_heads, a.head_dim)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        k, v = self.kv_cache.update(input_pos, start, k, v)
        if a.gqa == "repeat_interleave":
            k = k.repeat_interleave(a.n_head // a.n_local_heads, dim=1)
            v = v.repeat_interleave(a.n_head // a.n_local_heads, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, enable_gqa=True)
        return self.wo(y.transpose(1, 2).contiguous().view(b, t, a.dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim)
        self.ffn_norm = RMSNorm(args.dim)

    def forward(self, x, freqs, mask, input_pos, start):
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        half = args.head_dim // 2
        inv_freq = 1.0 / args.rope_base ** (torch.arange(half).float() / half)
        angles = torch.outer(torch.arange(args.block_size).float(), inv_freq)
        self.register_buffer("freqs_cis", torch.stack([angles.cos(), angles.sin()], -1), persistent=False)
        self.register_buffer("causal_mask", torch.ones(args.block_size, args.block_size, dtype=torch.bool).tril(),
                             persistent=False)

    def setup_caches(self, batch: int, max_seq: int) -> None:
        for block in self.layers:
            block.attention.kv_cache = KVCache(batch, max_seq, self.args.n_local_heads, self.args.head_dim,
                                               self.args.write)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, start: int = 0) -> torch.Tensor:
        """idx [B, T] at positions input_pos [T] (= start .. start + T - 1)."""
        max_seq = self.layers[0].attention.kv_cache.k_cache.shape[2]
        if self.args.write == "index_put":
            mask = self.causal_mask[None, None, input_pos, :max_seq]
        else:
            mask = self.causal_mask[None, None, start:start + idx.shape[1], :max_seq]
        freqs = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for block in self.layers:
            x = block(x, freqs, mask, input_pos, start)
        return self.output(self.norm(x))


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**overrides)).eval()


@torch.no_grad()
def generate(model: Transformer, forward, prompt: torch.Tensor, new_tokens: int, max_seq: int | None = None):
    """Greedy decoding the gpt-fast way: one prefill call, then one call per token with its position.
    `forward` is the model's forward, compiled or not. Returns (prompt + new tokens [B, T + new_tokens],
    each step's next-token logits [B, new_tokens, V])."""
    b, t = prompt.shape
    model.setup_caches(b, max_seq or t + new_tokens)
    logits = [forward(prompt, torch.arange(t), 0)[:, -1]]
    tokens = [prompt, logits[-1].argmax(-1, keepdim=True)]
    for i in range(new_tokens - 1):
        pos = t + i
        logits.append(forward(tokens[-1], torch.tensor([pos]), pos)[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)
