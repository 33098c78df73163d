"""All `torch.ops.kvfx.*` registrations, in one place, imported once (by `kvfx.kernels`).

These schemas are the contract between the passes (which insert the ops), the kernels (which
implement them) and lowering (which exports them):

- ``kvfx::attend(q, k, v, k_qparams?, v_qparams?, attn_mask?, kv_len, is_causal, scale, softcap=0.0) -> out``
  GQA attention of q [B, Hq, T, D] over a cache k, v [B, Hkv, S, D]. With qparams, k and v hold uint8
  codes and k_qparams, v_qparams [B, Hkv, S, 2] their per-token (scale, zero), dequantized inside
  attention. Only the first kv_len positions are attended (-1: all); attn_mask and is_causal mean
  what they mean for SDPA; softcap c > 0 caps the scaled scores as tanh(s / c) * c before the mask.
- ``kvfx::store_write(codes!, qparams!, pos, x) -> ()``
  Quantizes x [B, Hkv, T, D] and writes it at positions pos [T] (dim 2) of codes [B, Hkv, S, D] and
  qparams [B, Hkv, S, 2], in place.

CPU runs the references. On CUDA, a decode step (one query token) in fp16/bf16 takes the Triton
decode kernels: `attend` through `slot_attention.attend_positions`, `kivi_attend` through
`decode_attention.decode_attention_triton`, both reading the model's mask row by position; prompts
and calls the kernels do not take (per-head masks, is_causal, other head dims) take the references.
"""
from __future__ import annotations

import dataclasses

import torch

from kvfx.errors import KVFXError
from kvfx.kernels.attention import attend_int8_cpu, attend_reference, visible_prompt_keys
from kvfx.kernels.decode_attention import HEAD_DIMS, decode_attention_triton
from kvfx.kernels.formats import format_from_json
from kvfx.kernels.int8 import dequantize_int8_reference, quantize_int8_reference, store_write_int8_triton
from kvfx.kernels.kivi import KiviStore, dequantize_reference, store_write_reference, store_write_triton
from kvfx.kernels.policies import attend_prompt, decode_step, policy_attend_reference
from kvfx.kernels.slot_attention import attend_positions, attend_positions_supported, row_bias, row_mask


def _decode_kernels(q: torch.Tensor) -> bool:
    """Whether the ops take their Triton kernels (decode attention, the int8 write): on CUDA in half
    precision (fp32 stays on the exact references, as tl.dot would round its operands to tf32). Tests
    force it under the interpreter."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _check_fits(last: int, count: int, slots: int) -> None:
    """A write whose highest position is `last` must land inside the cache's `slots` (CPU only: on
    the GPU the check would cost a host sync per layer)."""
    if last >= slots:
        raise KVFXError(f"{count} new tokens at positions up to {last} do not fit the KV cache of "
                        f"{slots} slots; give the cache a larger max_cache_len")


@torch.library.custom_op("kvfx::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_qparams: torch.Tensor | None,
           v_qparams: torch.Tensor | None, attn_mask: torch.Tensor | None, kv_len: int, is_causal: bool,
           scale: float, softcap: float = 0.0) -> torch.Tensor:
    if (_decode_kernels(q) and softcap == 0.0
            and attend_positions_supported(q, k, v, k_qparams, v_qparams, attn_mask, is_causal)):
        return attend_positions(q, k, v, k_qparams, v_qparams, attn_mask, kv_len, scale)
    attn_mask, kv_len = visible_prompt_keys(attn_mask, kv_len, q.shape[2], is_causal, k.shape[2])
    if k_qparams is not None and v_qparams is not None and q.device.type == "cpu":
        return attend_int8_cpu(q, k, k_qparams, v, v_qparams, attn_mask, kv_len, is_causal, scale, softcap)
    if k_qparams is not None:
        k = dequantize_int8_reference(k, k_qparams, q.dtype)
    if v_qparams is not None:
        v = dequantize_int8_reference(v, v_qparams, q.dtype)
    return attend_reference(q, k, v, attn_mask, kv_len, is_causal, scale, softcap).contiguous()


@attend.register_fake
def _(q, k, v, k_qparams, v_qparams, attn_mask, kv_len, is_causal, scale, softcap=0.0):
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
            None, None, None, None, None, None, None)


attend.register_autograd(_attend_backward, setup_context=_attend_setup_context)


@torch.library.custom_op("kvfx::store_write", mutates_args=("codes", "qparams"))
def store_write(codes: torch.Tensor, qparams: torch.Tensor, pos: torch.Tensor, x: torch.Tensor) -> None:
    if _decode_kernels(x) and x.shape[-1] in HEAD_DIMS and codes.is_contiguous() and qparams.is_contiguous():
        return store_write_int8_triton(codes, qparams, pos, x)
    if pos.numel() and pos.device.type == "cpu":
        _check_fits(int(pos.max()), x.shape[2], codes.shape[2])
    new_codes, new_qparams = quantize_int8_reference(x)
    codes.index_copy_(2, pos, new_codes)
    qparams.index_copy_(2, pos, new_qparams.to(qparams.dtype))


@store_write.register_fake
def _(codes, qparams, pos, x):
    return None


# ---- KIVI (int4 / int2 / fp8) stores: kvfx.kernels.kivi holds the layout and the kernels. ----------
# The 8 store tensors are passed one by one (k_codes, v_codes, k_scale, k_zero, v_scale, v_zero,
# k_ring, v_ring), with the format as constants (bits, fp8, group_size, residual).


# A prompt's attention over a KIVI store dequantizes the cache, in fp32, for this many bytes' worth of
# batch rows at a time (the transient peak is a few times it): without blocks, a 32K prompt at batch 40
# would need as much transient memory as the bf16 cache the quantized one replaces.
PROMPT_BLOCK_BYTES = 1 << 28
KIVI_TENSORS = ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "k_ring", "v_ring")


def _kivi(tensors, bits, fp8, group_size, residual) -> KiviStore:
    return KiviStore(*tensors, bits, group_size, residual, fp8)


@torch.library.custom_op("kvfx::kivi_write", mutates_args=(
    "k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "k_ring", "v_ring"))
def kivi_write(k_codes: torch.Tensor, v_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
               v_scale: torch.Tensor, v_zero: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
               pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_len: int, bits: int, fp8: bool,
               group_size: int, residual: int) -> None:
    """Append k, v [B, Hkv, T, D] at positions pos [T] (= start .. start + T - 1, shared by the rows)."""
    store = _kivi((k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring), bits, fp8, group_size,
                  residual)
    if k.device.type == "cpu":
        start = int(pos[0])
        _check_fits(start + k.shape[2] - 1, k.shape[2], max_len)
        store_write_reference(store, k, v, start)
    else:  # no host sync on the GPU: the start stays a device tensor
        store_write_triton(store, k, v, pos[:1])


@kivi_write.register_fake
def _(k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring, pos, k, v, max_len, bits, fp8,
      group_size, residual):
    return None


@torch.library.custom_op("kvfx::kivi_attend", mutates_args=())
def kivi_attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
                k_codes: torch.Tensor, v_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                v_scale: torch.Tensor, v_zero: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                attn_mask: torch.Tensor | None, kv_len: int, width: int, is_causal: bool, scale: float,
                bits: int, fp8: bool, group_size: int, residual: int, softcap: float = 0.0) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over a KIVI store after the write of k_new, v_new at pos.

    The cache's older tokens are read dequantized, the T new ones at full precision (KIVI attends a
    prompt over its own keys unquantized). Attends over the first kv_len slots (-1: all `width`
    slots of the model's buffer, unwritten ones reading as zeros as in the model's zeroed cache).
    softcap as for `attend` (the decode kernels have none: such a step takes the reference).
    """
    store = _kivi((k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring), bits, fp8, group_size,
                  residual)
    b, t, d = q.shape[0], q.shape[2], q.shape[3]
    attn_mask, kv_len = visible_prompt_keys(attn_mask, kv_len, t, is_causal, width)  # (a decode step: as is)
    n = width if kv_len < 0 else kv_len
    # A decode step: the new token is in the ring already (residual > 0 keeps it at full precision).
    if (t == 1 and _decode_kernels(q) and residual > 0 and d in HEAD_DIMS and not is_causal and softcap == 0.0
            and row_mask(attn_mask)):
        lengths = (pos[:1] + 1).to(torch.int32).expand(b)  # on the device: no host sync
        return decode_attention_triton(q, store, lengths, scale, bias=row_bias(attn_mask, b, n, q.device))
    written = int(pos[0]) + t
    out = torch.empty(*q.shape[:-1], v_new.shape[-1], dtype=q.dtype, device=q.device)
    rows = max(1, PROMPT_BLOCK_BYTES // (4 * store.k_ring.shape[1] * written * d))
    for r in range(0, b, rows):  # blocks of batch rows: the dequantized cache is transient memory
        block = slice(r, r + rows)
        part = dataclasses.replace(store, **{f: getattr(store, f)[block] for f in KIVI_TENSORS})
        keys, values = dequantize_reference(part, written, q.dtype)
        full = []
        for cached, new in ((keys, k_new[block]), (values, v_new[block])):
            cached = torch.nn.functional.pad(cached, (0, 0, 0, max(n - cached.shape[2], 0)))[:, :, :n]
            full.append(cached.index_copy(2, pos[pos < n], new[:, :, : int((pos < n).sum())].to(q.dtype)))
        mask = attn_mask[block] if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[0] == b \
            else attn_mask
        out[block] = attend_reference(q[block], full[0], full[1], mask, -1, is_causal, scale, softcap)
    return out


@kivi_attend.register_fake
def _(q, k_new, v_new, pos, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring, attn_mask, kv_len,
      width, is_causal, scale, bits, fp8, group_size, residual, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v_new.shape[-1]))


@torch.library.custom_op("kvfx::store_alloc", mutates_args=())
def store_alloc(shape: list[int], dtype: torch.dtype, device: torch.device, options: str, layer: int,
                layers: int) -> list[torch.Tensor]:
    """A new, empty store for a cache buffer of `shape` [B, Hkv, S, D] (what a graph that allocates its
    own cache allocates instead), in the format of `options` (a `KVConfig` as JSON), for attention
    site `layer` of `layers` (PyramidKV budgets differ by layer)."""
    return list(format_from_json(options).allocate(shape, dtype, device, layer, layers).tensors())


@store_alloc.register_fake
def _(shape, dtype, device, options, layer, layers):
    return list(format_from_json(options).allocate(shape, dtype, device, layer, layers).tensors())


# ---- Policies (StreamingLLM, H2O, SnapKV, PyramidKV, Quest): kvfx.kernels.policies. ----------------
# The 8 `TokenStore` tensors are passed one by one, the options as the config's JSON.


@torch.library.custom_op("kvfx::policy_attend", mutates_args=(
    "k_codes", "k_params", "v_codes", "v_params", "slot_pos", "score", "page_min", "page_max"))
def policy_attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
                  k_codes: torch.Tensor, k_params: torch.Tensor, v_codes: torch.Tensor, v_params: torch.Tensor,
                  slot_pos: torch.Tensor, score: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                  attn_mask: torch.Tensor | None, is_causal: bool, scale: float, options: str, layer: int,
                  layers: int, softcap: float = 0.0) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over the kept tokens and the new k_new, v_new [B, Hkv, T, D] at
    positions pos [T] (shared by the rows), then the policy's write of the new tokens into the store.
    softcap as for `attend` (a softcapped decode step runs `decode_step_reference`)."""
    fmt = format_from_json(options)
    store = fmt.from_tensors((k_codes, k_params, v_codes, v_params, slot_pos, score, page_min, page_max))
    if q.shape[2] == 1:  # a decode step: the copy-free path
        return decode_step(q, k_new, v_new, pos, store, attn_mask, is_causal, scale, fmt.spec, layer,
                           softcap).contiguous()
    return policy_attend_reference(q, k_new, v_new, pos, store, attn_mask, is_causal, scale, fmt.spec, layer,
                                   layers, attend=attend_prompt, softcap=softcap).contiguous()


@policy_attend.register_fake
def _(q, k_new, v_new, pos, k_codes, k_params, v_codes, v_params, slot_pos, score, page_min, page_max, attn_mask,
      is_causal, scale, options, layer, layers, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v_new.shape[-1]))
