"""ONNX translations of the `kvfx::` ops (onnxscript, standard ONNX ops only, opset 23).

Each function computes what the op's PyTorch reference computes (kernels/attention.py,
kernels/int8.py, kernels/kivi.py), in the same order of float operations where that decides a
rounding (the quantizers), so an exported store holds the same codes as the PyTorch store.

What onnxruntime 1.32 CPU executes (checked by running it, tests/lowering/test_ort_support.py) and
what that decided here:
- ``Attention`` (opset 23) runs with GQA (fewer KV heads than query heads, head h reading KV head
  h // g, HF's repeat_kv order) and a boolean mask: every attention here is one Attention node.
- Packed 4-/2-bit codes are uint8 tensors (kvfx's layout, little end first) unpacked with
  ``BitShift`` + ``BitwiseAnd``. ONNX's INT4/UINT4/INT2/UINT2 types cannot hold the cache: ORT has no
  Gather/ScatterElements for them (the spec excludes them) and no TensorScatter kernel, so a graph
  cannot update such a cache; blocked ``DequantizeLinear`` (which ORT runs for them) also has only
  integer zero points, while KIVI's zero is the fp minimum.
- Cache writes are ``ScatterElements`` along the sequence axis (any positions, as the op contracts
  allow); KIVI's group flushes write a fixed number of candidate groups whose unused ones rewrite
  what is already there, so the indices stay distinct and the shapes static.
"""
from __future__ import annotations

import onnx
from onnxscript import opset23 as op

from kvfx.errors import KVFXError

FLOAT, INT32, INT64, UINT8 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8
OPSET = 23  # Attention


def _ints(*values):
    return op.Constant(value_ints=list(values))


def _int(value):
    return op.Constant(value_int=value)


def _float(value):
    return op.Constant(value_float=value)


def _u8(*values):
    return op.Cast(_ints(*values), to=UINT8)


def _dims(x, start, end):
    return op.Shape(x, start=start, end=end)


def _arange(n):
    """0 .. n-1 (int64); n an int or a 1-element int64 tensor."""
    n = _int(n) if isinstance(n, int) else op.Squeeze(n, _ints(0))
    return op.Range(_int(0), n, _int(1))


def _along_seq(index, like):
    """An index [N] along dim 2, broadcast to like's [B, H, N, X] (what ScatterElements wants)."""
    return op.Expand(op.Reshape(index, _ints(1, 1, -1, 1)), op.Shape(like))


def _seq_mask(cond):
    """[N] bool -> [1, 1, N, 1], to select whole positions of a [B, H, N, X] tensor."""
    return op.Reshape(cond, _ints(1, 1, -1, 1))


def _qlen(length, group_size, residual):
    """KIVI's qlen(L) = G * floor(max(L - R, 0) / G) (int64, L >= 0)."""
    return op.Mul(op.Div(op.Max(op.Sub(length, _ints(residual)), _ints(0)), _ints(group_size)), _ints(group_size))


# ---- attention -------------------------------------------------------------------------------


def _attention(q, k, v, attn_mask, kv_len, is_causal, scale):
    if not (isinstance(kv_len, int) and kv_len < 0):  # attend the first kv_len slots only
        stop = _ints(kv_len) if isinstance(kv_len, int) else op.Reshape(kv_len, _ints(1))
        k, v = (op.Slice(t, _ints(0), stop, _ints(2)) for t in (k, v))
    mask = () if attn_mask is None else (attn_mask,)
    outputs = op.Attention(q, k, v, *mask, is_causal=int(is_causal), scale=scale)
    return outputs[0]  # Attention has 4 outputs (output, present k/v, qk matmul); the first is attention


def _dequantize_int8(codes, qparams, like):
    """codes * scale + zero per token (kernels/int8.py), computed in fp32, in like's dtype."""
    qparams = op.Cast(qparams, to=FLOAT)
    scale = op.Slice(qparams, _ints(0), _ints(1), _ints(3))
    zero = op.Slice(qparams, _ints(1), _ints(2), _ints(3))
    return op.CastLike(op.Add(op.Mul(op.Cast(codes, to=FLOAT), scale), zero), like)


def attend(q, k, v, k_qparams=None, v_qparams=None, attn_mask=None, kv_len: int = -1, is_causal: bool = False,
           scale: float = 1.0):
    """kvfx::attend: GQA attention over an fp cache, or an int8 one dequantized per token."""
    if k_qparams is not None:
        k = _dequantize_int8(k, k_qparams, q)
    if v_qparams is not None:
        v = _dequantize_int8(v, v_qparams, q)
    return _attention(q, k, v, attn_mask, kv_len, is_causal, scale)


# ---- per-token int8 store --------------------------------------------------------------------


def store_update(codes, qparams, pos, x):
    """kvfx::store_update: quantize x [B, H, T, D] per token (kernels/int8.py) and write at pos [T]."""
    xf = op.Cast(x, to=FLOAT)
    low = op.ReduceMin(xf, _ints(-1), keepdims=1)
    high = op.ReduceMax(xf, _ints(-1), keepdims=1)
    scale = op.Where(op.Greater(high, low), op.Div(op.Sub(high, low), _float(255.0)), _float(1.0))
    new_codes = op.Cast(op.Clip(op.Round(op.Div(op.Sub(xf, low), scale)), _float(0.0), _float(255.0)), to=UINT8)
    new_qparams = op.CastLike(op.Concat(scale, low, axis=-1), qparams)
    return (op.ScatterElements(codes, _along_seq(pos, new_codes), new_codes, axis=2),
            op.ScatterElements(qparams, _along_seq(pos, new_qparams), new_qparams, axis=2))


# ---- KIVI store (kernels/kivi.py: layout and arithmetic) ---------------------------------------


def _pack(codes, bits):
    """int32 codes [B, H, N, D] (< 2^bits) -> uint8 [B, H, N, D * bits / 8], little end first."""
    per_byte = 8 // bits
    weights = op.Cast(_ints(*(1 << (bits * i) for i in range(per_byte))), to=INT32)
    grouped = op.Reshape(codes, _ints(0, 0, 0, -1, per_byte))
    return op.Cast(op.ReduceSum(op.Mul(grouped, weights), _ints(-1), keepdims=0), to=UINT8)


def _unpack(packed, bits):
    """uint8 [B, H, N, D * bits / 8] -> fp32 codes [B, H, N, D] (BitShift + BitwiseAnd)."""
    per_byte = 8 // bits
    shifts = _u8(*(bits * i for i in range(per_byte)))
    parts = op.BitwiseAnd(op.BitShift(op.Unsqueeze(packed, _ints(-1)), shifts, direction="RIGHT"),
                          _u8((1 << bits) - 1))
    return op.Cast(op.Reshape(parts, _ints(0, 0, 0, -1)), to=FLOAT)


def _quantize_asym(x, axis, bits, like):
    """kivi.quantize_asym_reference reducing over `axis` (kept): (codes int32, scale, zero in fp32
    after rounding through like's dtype, as the reference stores them)."""
    low = op.ReduceMin(x, _ints(axis), keepdims=1)
    high = op.ReduceMax(x, _ints(axis), keepdims=1)
    scale = op.Cast(op.CastLike(op.Div(op.Sub(high, low), _float(float((1 << bits) - 1))), like), to=FLOAT)
    scale = op.Where(op.Greater(scale, _float(0.0)), scale, _float(1.0))
    zero = op.Cast(op.CastLike(low, like), to=FLOAT)
    codes = op.Clip(op.Floor(op.Add(op.Div(op.Sub(x, zero), scale), _float(0.5))), _float(0.0),
                    _float(float((1 << bits) - 1)))
    return op.Cast(codes, to=INT32), scale, zero


def _write_groups(store, index, valid, update):
    """Write `update` [B, H, N, X] at positions `index` [N] (distinct) along dim 2 of `store`, where
    `valid` [N]; elsewhere the store's own content is written back (a no-op write)."""
    kept = op.Gather(store, index, axis=2)
    update = op.Where(_seq_mask(valid), update, kept)
    return op.ScatterElements(store, _along_seq(index, update), update, axis=2)


def kivi_update(k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring, pos, k, v, max_len: int,
                bits: int, fp8: bool, group_size: int, residual: int):
    """kvfx::kivi_update: append k, v [B, H, T, D] at pos = start .. start + T - 1 to a KIVI store.

    As kivi.store_write_reference: tokens [qlen(start), qlen(start + T)) leave the residual window and
    are quantized in groups of G (the older ones read from the ring, the rest from k, v); the new
    tokens from max(qlen(start + T), start) on go to the ring at slot pos % (R + G).
    """
    g, ring_size = group_size, residual + group_size
    groups = max_len // g
    start = op.Slice(pos, _ints(0), _ints(1))                      # [1]
    t = _dims(k, 2, 3)                                             # [1]
    end = op.Add(start, t)
    q0, q1 = _qlen(start, g, residual), _qlen(end, g, residual)
    new_k, new_v = op.CastLike(k, k_ring), op.CastLike(v, v_ring)
    out = [k_codes, v_codes, k_scale, k_zero, v_scale, v_zero]
    if groups > 0:
        # Candidate groups j = 0 .. n-1 start at q0 + j*G (n = ceil(T / G) bounds q1 - q0); those past
        # q1 are not flushed. Target group (q0/G + j) mod NG keeps the n targets distinct.
        n = op.Min(op.Div(op.Add(t, _ints(g - 1)), _ints(g)), _ints(groups))
        j = _arange(n)
        first = op.Add(q0, op.Mul(j, _ints(g)))                                     # [n]
        valid = op.Less(first, q1)
        target = op.Mod(op.Add(op.Div(q0, _ints(g)), j), _ints(groups))           # [n]
        offsets = op.Reshape(_arange(g), _ints(1, -1))
        tokens = op.Reshape(op.Add(op.Reshape(first, _ints(-1, 1)), offsets), _ints(-1))       # [n*G]
        slots = op.Reshape(op.Add(op.Reshape(op.Mul(target, _ints(g)), _ints(-1, 1)), offsets), _ints(-1))
        valid_tokens = op.Reshape(op.Expand(op.Reshape(valid, _ints(-1, 1)), op.Concat(n, _ints(g), axis=0)),
                                  _ints(-1))
        # Token x comes from the ring (x < start, slot x mod W) or from the new ones (W + x - start).
        from_new = op.Add(_ints(ring_size), op.Min(op.Sub(tokens, start), op.Sub(t, _ints(1))))
        source = op.Where(op.Less(tokens, start), op.Mod(tokens, _ints(ring_size)), from_new)
        windows = [op.Cast(op.Gather(op.Concat(ring, new, axis=2), source, axis=2), to=FLOAT)
                   for ring, new in ((k_ring, new_k), (v_ring, new_v))]
        # Keys: per channel over each group of G tokens.
        keys = op.Reshape(windows[0], op.Concat(_dims(k, 0, 2), n, _ints(g), _dims(k, 3, 4), axis=0))
        codes, scale, zero = _quantize_asym(keys, 3, bits, k_ring)
        packed = _pack(op.Reshape(codes, op.Concat(_dims(k, 0, 2), _ints(-1), _dims(k, 3, 4), axis=0)), bits)
        out[0] = _write_groups(k_codes, slots, valid_tokens, packed)
        out[2] = _write_groups(k_scale, target, valid, op.CastLike(op.Squeeze(scale, _ints(3)), k_scale))
        out[3] = _write_groups(k_zero, target, valid, op.CastLike(op.Squeeze(zero, _ints(3)), k_zero))
        # Values: per token over each group of G channels.
        values = op.Reshape(windows[1], _ints(0, 0, 0, -1, g))
        codes, scale, zero = _quantize_asym(values, 4, bits, v_ring)
        packed = _pack(op.Reshape(codes, _ints(0, 0, 0, -1)), bits)
        out[1] = _write_groups(v_codes, slots, valid_tokens, packed)
        out[4] = _write_groups(v_scale, slots, valid_tokens, op.CastLike(op.Squeeze(scale, _ints(4)), v_scale))
        out[5] = _write_groups(v_zero, slots, valid_tokens, op.CastLike(op.Squeeze(zero, _ints(4)), v_zero))
    # Ring slot r holds the newest position p_r < end with p_r = r (mod W); it is rewritten when that
    # position is one of the new tokens kept in fp (p_r >= max(q1, start)).
    slot = _arange(ring_size)
    last = op.Sub(end, _ints(1))
    newest = op.Sub(last, op.Mod(op.Sub(last, slot), _ints(ring_size)))
    rewrite = _seq_mask(op.GreaterOrEqual(newest, op.Max(q1, start)))
    take = op.Clip(op.Sub(newest, start), _int(0), op.Squeeze(op.Sub(t, _ints(1)), _ints(0)))
    rings = [op.Where(rewrite, op.Gather(new, take, axis=2), ring) for ring, new in ((k_ring, new_k), (v_ring, new_v))]
    return (*out, *rings)


def _dequantize_kivi(codes, scale, zero, bits, group_size, keys: bool):
    """Packed codes of all quantized slots -> fp32 [B, H, NG*G, D] (kivi._dequantize_codes)."""
    x = _unpack(codes, bits)
    scale, zero = op.Cast(scale, to=FLOAT), op.Cast(zero, to=FLOAT)
    if keys:  # one (scale, zero) per channel per group of G tokens
        grouped = op.Reshape(x, op.Concat(_dims(x, 0, 2), _ints(-1, group_size), _dims(x, 3, 4), axis=0))
        scale, zero = op.Unsqueeze(scale, _ints(3)), op.Unsqueeze(zero, _ints(3))
    else:     # one per token per group of G channels
        grouped = op.Reshape(x, _ints(0, 0, 0, -1, group_size))
        scale, zero = op.Unsqueeze(scale, _ints(4)), op.Unsqueeze(zero, _ints(4))
    return op.Reshape(op.Add(op.Mul(grouped, scale), zero), op.Shape(x))


def kivi_attend(q, k_new, v_new, pos, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring,
                attn_mask=None, kv_len: int = -1, width: int = 0, is_causal: bool = False, scale: float = 1.0,
                bits: int = 4, fp8: bool = False, group_size: int = 32, residual: int = 128):
    """kvfx::kivi_attend: attention over the first n slots (n = kv_len, or width when -1) of a KIVI
    store after the write: slots < qlen(L) dequantized, [qlen(L), L) from the ring, the T new tokens at
    full precision from k_new/v_new, later slots zero."""
    if not isinstance(kv_len, int):
        raise KVFXError("kvfx's ONNX export has no kivi_attend over a symbolic kv_len (a prefix of the cache "
                        "whose length is traced); export with a static cache read whole")
    n = width if kv_len < 0 else kv_len
    g, ring_size = group_size, residual + group_size
    quantized_slots = (width // g) * g
    start = op.Slice(pos, _ints(0), _ints(1))
    t = _dims(k_new, 2, 3)
    end = op.Add(start, t)
    qlen = _qlen(end, g, residual)
    p = _arange(n)
    in_store, in_ring = _seq_mask(op.Less(p, qlen)), _seq_mask(op.Less(p, end))
    is_new = _seq_mask(op.And(op.GreaterOrEqual(p, start), op.Less(p, end)))
    new_index = op.Clip(op.Sub(p, start), _int(0), op.Squeeze(op.Sub(t, _ints(1)), _ints(0)))
    ring_index = op.Mod(p, _ints(ring_size))
    full = []
    for codes, qscale, qzero, ring, new, keys in ((k_codes, k_scale, k_zero, k_ring, k_new, True),
                                                  (v_codes, v_scale, v_zero, v_ring, v_new, False)):
        zeros = op.Expand(_float(0.0), op.Concat(op.Shape(ring, start=0, end=2), _ints(n), op.Shape(ring, start=3),
                                                 axis=0))
        if quantized_slots:
            deq = _dequantize_kivi(codes, qscale, qzero, bits, g, keys)
            deq = op.Slice(op.Pad(deq, _ints(0, 0, 0, 0, 0, 0, max(n - quantized_slots, 0), 0)), _ints(0), _ints(n),
                           _ints(2))
        else:
            deq = zeros
        older = op.Where(in_store, deq, op.Where(in_ring, op.Cast(op.Gather(ring, ring_index, axis=2), to=FLOAT),
                                                 zeros))
        x = op.Where(is_new, op.Cast(op.Gather(new, new_index, axis=2), to=FLOAT), older)
        full.append(op.CastLike(x, q))
    return _attention(q, full[0], full[1], attn_mask, -1, is_causal, scale)


def translation_table() -> dict:
    import torch

    import kvfx.lowering.functional  # noqa: F401  (registers kvfx::store_update, kvfx::kivi_update)

    return {
        torch.ops.kvfx.attend.default: attend,
        torch.ops.kvfx.store_update.default: store_update,
        torch.ops.kvfx.kivi_update.default: kivi_update,
        torch.ops.kvfx.kivi_attend.default: kivi_attend,
    }
