"""All `torch.ops.kvfx.*` registrations, in one place, imported once (by `kvfx.kernels`).

These schemas are the contract between the passes (which insert the ops), the kernels (which
implement them) and lowering (which exports them):

- ``kvfx::attend(q, k, v, k_qparams?, v_qparams?, attn_mask?, kv_len, is_causal, scale) -> out``
  GQA attention of q [B, Hq, T, D] over a cache k, v [B, Hkv, S, D]. With qparams, k and v hold uint8
  codes and k_qparams, v_qparams [B, Hkv, S, 2] their per-token (scale, zero), dequantized inside
  attention. Only the first kv_len positions are attended (-1: all); attn_mask and is_causal mean
  what they mean for SDPA.
- ``kvfx::store_write(codes!, qparams!, pos, x) -> ()``
  Quantizes x [B, Hkv, T, D] and writes it at positions pos [T] (dim 2) of codes [B, Hkv, S, D] and
  qparams [B, Hkv, S, 2], in place.

The CPU and CUDA implementations are the references (the Triton kernels slot in per device).
"""
from __future__ import annotations

import torch

from kvfx.errors import KVFXError
from kvfx.kernels.attention import attend_int8_cpu, attend_reference
from kvfx.kernels.int8 import dequantize_int8_reference, quantize_int8_reference


@torch.library.custom_op("kvfx::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_qparams: torch.Tensor | None,
           v_qparams: torch.Tensor | None, attn_mask: torch.Tensor | None, kv_len: int, is_causal: bool,
           scale: float) -> torch.Tensor:
    if k_qparams is not None and v_qparams is not None and q.device.type == "cpu":
        return attend_int8_cpu(q, k, k_qparams, v, v_qparams, attn_mask, kv_len, is_causal, scale)
    if k_qparams is not None:
        k = dequantize_int8_reference(k, k_qparams, q.dtype)
    if v_qparams is not None:
        v = dequantize_int8_reference(v, v_qparams, q.dtype)
    return attend_reference(q, k, v, attn_mask, kv_len, is_causal, scale).contiguous()


@attend.register_fake
def _(q, k, v, k_qparams, v_qparams, attn_mask, kv_len, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _attend_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs[:6] if t is not None))
    ctx.present = [t is not None for t in inputs[:6]]
    ctx.options = inputs[6:]


def _attend_backward(ctx, grad_out):
    """Recompute the reference forward under autograd (attention is cheap to recompute; nothing
    large is saved). Quantized codes and scales get no gradient."""
    saved = iter(ctx.saved_tensors)
    q, k, v, k_qparams, v_qparams, mask = (next(saved) if p else None for p in ctx.present)
    with torch.enable_grad():
        q = q.detach().requires_grad_()
        k = k.detach().requires_grad_() if k_qparams is None else dequantize_int8_reference(k, k_qparams, q.dtype)
        v = v.detach().requires_grad_() if v_qparams is None else dequantize_int8_reference(v, v_qparams, q.dtype)
        out = attend_reference(q, k, v, mask, *ctx.options)
        wrt = [t for t in (q, k, v) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad_out))
    return (next(grads), next(grads) if k_qparams is None else None, next(grads) if v_qparams is None else None,
            None, None, None, None, None, None)


attend.register_autograd(_attend_backward, setup_context=_attend_setup_context)


@torch.library.custom_op("kvfx::store_write", mutates_args=("codes", "qparams"))
def store_write(codes: torch.Tensor, qparams: torch.Tensor, pos: torch.Tensor, x: torch.Tensor) -> None:
    if pos.numel() and pos.device.type == "cpu" and int(pos.max()) >= codes.shape[2]:
        raise KVFXError(f"{x.shape[2]} new tokens at positions up to {int(pos.max())} do not fit the KV cache of "
                        f"{codes.shape[2]} slots; give the cache a larger max_cache_len")
    new_codes, new_qparams = quantize_int8_reference(x)
    codes.index_copy_(2, pos, new_codes)
    qparams.index_copy_(2, pos, new_qparams.to(qparams.dtype))


@store_write.register_fake
def _(codes, qparams, pos, x):
    return None
