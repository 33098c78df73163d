"""A nanoGPT / GPT-2-style decoder (karpathy/nanoGPT `model.py` plus the usual `past`/`present`
cache): learned positions, LayerNorm, GELU MLP, multi-head attention written by hand with a causal
`bias` buffer, and a cache that grows by concatenation:

    k = torch.cat((past_k, k), dim=-2);  present = (k, v)      # returned to the caller

The prefill call has no past (present = the prompt's own k, v).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    alibi: bool = False   # add an ALiBi position bias to the scores (BLOOM/MPT style) instead of learned positions


def alibi_slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.alibi = config.n_head, config.n_embd, config.alibi
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        n = config.block_size
        self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))
        distance = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query: <= 0 where attended
        self.register_buffer("position_bias", alibi_slopes(config.n_head)[:, None, None] * distance, persistent=False)

    def forward(self, x, past=None):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for y in (q, k, v))
        if past is not None:
            k = torch.cat((past[0], k), dim=-2)
            v = torch.cat((past[1], v), dim=-2)
        present = (k, v)
        start, s = k.size(-2) - t, k.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if self.alibi:
            att = att + self.position_bias[None, :, start:s, :s]
        att = att.masked_fill(self.bias[:, :, start:s, :s] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y), present


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, x, past=None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx, past=None):
        """idx [B, T] after `past` (a tuple of per-layer (k, v) [B, H, L, D], or None): (logits, presents)."""
        start = 0 if past is None else past[0][0].size(-2)
        x = self.wte(idx)
        if not self.config.alibi:
            x = x + self.wpe(torch.arange(start, start + idx.size(1), device=idx.device))
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, None if past is None else past[i])
            presents.append(present)
        return self.lm_head(self.ln_f(x)), tuple(presents)


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**overrides)).eval()


@torch.no_grad()
def generate(forward, prompt: torch.Tensor, new_tokens: int):
    """Greedy decoding with the presents fed back as the next past. Returns (prompt + new tokens
    [B, T + new_tokens], each step's next-token logits [B, new_tokens, V])."""
    out, past = forward(prompt)
    logits = [out[:, -1]]
    tokens = [prompt, logits[-1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out, past = forward(tokens[-1], past)
        logits.append(out[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)
