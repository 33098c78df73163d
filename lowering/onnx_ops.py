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
from kvfx.kernels.kivi import key_param_slots

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


def _refuse_softcap(softcap: float) -> None:
    if softcap:  # ONNX Attention caps after adding the mask; kvfx (Gemma-2) caps before it
        raise KVFXError(f"ONNX export of softcapped attention (softcap={softcap}) is not supported yet")


def _attention(q, k, v, attn_mask, kv_len, is_causal, scale, softcap: float = 0.0):
    _refuse_softcap(softcap)
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
           scale: float = 1.0, softcap: float = 0.0):
    """kvfx::attend: GQA attention over an fp cache, or an int8 one dequantized per token."""
    if k_qparams is not None:
        k = _dequantize_int8(k, k_qparams, q)
    if v_qparams is not None:
        v = _dequantize_int8(v, v_qparams, q)
    return _attention(q, k, v, attn_mask, kv_len, is_causal, scale, softcap)


# ---- per-token int8 store --------------------------------------------------------------------


def _quantize_int8(x, like):
    """kernels/int8.quantize_int8_reference: (codes uint8, qparams [..., 2] = (scale, zero) in like's dtype)."""
    xf = op.Cast(x, to=FLOAT)
    low = op.ReduceMin(xf, _ints(-1), keepdims=1)
    high = op.ReduceMax(xf, _ints(-1), keepdims=1)
    scale = op.Where(op.Greater(high, low), op.Div(op.Sub(high, low), _float(255.0)), _float(1.0))
    codes = op.Cast(op.Clip(op.Round(op.Div(op.Sub(xf, low), scale)), _float(0.0), _float(255.0)), to=UINT8)
    return codes, op.CastLike(op.Concat(scale, low, axis=-1), like)


def store_update(codes, qparams, pos, x):
    """kvfx::store_update: quantize x [B, H, T, D] per token (kernels/int8.py) and write at pos [T]."""
    new_codes, new_qparams = _quantize_int8(x, qparams)
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


def _write_token_minor(store, target, valid, update, group_size):
    """Write per-token value params `update` [B, H, n*G, D/G] (n whole groups) into the groups `target`
    [n] of a store laid out [B, H, NG, D/G, G] (kivi.token_minor), where `valid` [n]."""
    grouped = op.Reshape(update, op.Concat(_dims(update, 0, 2), _ints(-1, group_size), _dims(update, 3, 4),
                                           axis=0))                                  # [B, H, n, G, D/G]
    rows = op.Reshape(op.Transpose(grouped, perm=[0, 1, 2, 4, 3]), _ints(0, 0, 0, -1))  # [B, H, n, D/G*G]
    flat = op.Reshape(store, _ints(0, 0, 0, -1))
    return op.Reshape(_write_groups(flat, target, valid, rows), op.Shape(store))


def _key_param_order(params, bits, to_store: bool):
    """Key params [B, H, N, D] in the store's slot-major order (to_store: kivi.slot_major) or back in
    channel order (kivi.channel_major); int4 only, the other formats keep channel order."""
    pb = key_param_slots(bits)
    if pb == 1:
        return params
    split = _ints(0, 0, 0, -1, pb) if to_store else _ints(0, 0, 0, pb, -1)
    return op.Reshape(op.Transpose(op.Reshape(params, split), perm=[0, 1, 2, 4, 3]), _ints(0, 0, 0, -1))


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
        for i, (store, param) in ((2, (k_scale, scale)), (3, (k_zero, zero))):
            param = _key_param_order(op.CastLike(op.Squeeze(param, _ints(3)), store), bits, to_store=True)
            out[i] = _write_groups(store, target, valid, param)
        # Values: per token over each group of G channels.
        values = op.Reshape(windows[1], _ints(0, 0, 0, -1, g))
        codes, scale, zero = _quantize_asym(values, 4, bits, v_ring)
        packed = _pack(op.Reshape(codes, _ints(0, 0, 0, -1)), bits)
        out[1] = _write_groups(v_codes, slots, valid_tokens, packed)
        out[4] = _write_token_minor(v_scale, target, valid, op.CastLike(op.Squeeze(scale, _ints(4)), v_scale), g)
        out[5] = _write_token_minor(v_zero, target, valid, op.CastLike(op.Squeeze(zero, _ints(4)), v_zero), g)
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
    if keys:  # one (scale, zero) per channel per group of G tokens, stored slot-major (kivi.slot_major)
        grouped = op.Reshape(x, op.Concat(_dims(x, 0, 2), _ints(-1, group_size), _dims(x, 3, 4), axis=0))
        scale, zero = (op.Unsqueeze(_key_param_order(t, bits, to_store=False), _ints(3)) for t in (scale, zero))
    else:     # one per token per group of G channels, stored [B, H, NG, D/G, G] (kivi.token_minor)
        grouped = op.Reshape(x, _ints(0, 0, 0, -1, group_size))
        per_token = op.Concat(_dims(scale, 0, 2), _ints(-1), _dims(scale, 3, 4), axis=0)  # [B, H, NG*G, D/G]
        scale, zero = (op.Unsqueeze(op.Reshape(op.Transpose(t, perm=[0, 1, 2, 4, 3]), per_token), _ints(4))
                       for t in (scale, zero))
    return op.Reshape(op.Add(op.Mul(grouped, scale), zero), op.Shape(x))


def kivi_attend(q, k_new, v_new, pos, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring,
                attn_mask=None, kv_len: int = -1, width: int = 0, is_causal: bool = False, scale: float = 1.0,
                bits: int = 4, fp8: bool = False, group_size: int = 32, residual: int = 128, softcap: float = 0.0):
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
    return _attention(q, full[0], full[1], attn_mask, -1, is_causal, scale, softcap)


# ---- eviction policies over a TokenStore (kernels/policies.py, kernels/token_store.py) ---------------

_EXPORTED_POLICIES = ("streaming",)
_TOKEN_CODECS = ("none", "int8", "int4", "int2")


def _token_quantize(x, codes_like, params_like, kv, group_size):
    """token_store.TokenCodec.quantize of x [B, H, T, D] (in the store's dtype): (codes, params)."""
    if kv == "none":
        return op.CastLike(x, codes_like), None
    if kv == "int8":
        return _quantize_int8(x, params_like)
    bits = {"int4": 4, "int2": 2}[kv]
    grouped = op.Reshape(op.Cast(x, to=FLOAT), _ints(0, 0, 0, -1, group_size))
    codes, scale, zero = _quantize_asym(grouped, 4, bits, params_like)
    params = op.Reshape(op.Concat(scale, zero, axis=-1), _ints(0, 0, 0, -1))  # (scale, zero) per group
    return _pack(op.Reshape(codes, _ints(0, 0, 0, -1)), bits), op.CastLike(params, params_like)


def _token_dequantize(codes, params, like, kv, group_size):
    """token_store.TokenCodec.dequantize: every slot [B, H, C, D] in like's dtype."""
    if kv == "none":
        return op.CastLike(codes, like)
    if kv == "int8":
        return _dequantize_int8(codes, params, like)
    x = _unpack(codes, {"int4": 4, "int2": 2}[kv])
    grouped = op.Reshape(x, _ints(0, 0, 0, -1, group_size))
    params = op.Reshape(op.Cast(params, to=FLOAT), _ints(0, 0, 0, -1, 2))
    scale = op.Slice(params, _ints(0), _ints(1), _ints(4))
    zero = op.Slice(params, _ints(1), _ints(2), _ints(4))
    return op.CastLike(op.Reshape(op.Add(op.Mul(grouped, scale), zero), op.Shape(x)), like)


def _per_query_head(x, q, hkv):
    """[B, Hkv, T|1, N] -> [B, Hq, T|1, N]: KV head k's rows for its g query heads k*g .. k*g+g-1."""
    group = op.Div(_dims(q, 1, 2), hkv)
    shape = op.Concat(_dims(x, 0, 2), group, _dims(x, 2, 4), axis=0)
    return op.Reshape(op.Expand(op.Unsqueeze(x, _ints(2)), shape), op.Concat(_dims(q, 0, 2), _dims(x, 2, 4), axis=0))


def _candidate_bias(attn_mask, is_causal, positions, pos, q):
    """policies.candidate_bias as [B, Hq, T, N] fp32: the model's mask read at the candidates' positions
    [B, Hkv, N] (-1: empty slot), -inf where a query may not see a candidate."""
    hkv = _dims(positions, 1, 2)
    t = _dims(q, 2, 3)
    cand = op.Unsqueeze(positions, _ints(2))                                      # [B, Hkv, 1, N]
    if attn_mask is None:
        if is_causal:
            visible = op.LessOrEqual(cand, op.Reshape(pos, _ints(1, 1, -1, 1)))   # [B, Hkv, T, N]
        else:
            visible = op.GreaterOrEqual(cand, _ints(0))
        visible = _per_query_head(op.Expand(visible, op.Concat(_dims(cand, 0, 2), t, _dims(cand, 3, 4), axis=0)),
                                  q, hkv)
        bias = op.Where(visible, _float(0.0), _float(float("-inf")))
    else:
        cols = _dims(attn_mask, 3, 4)
        index = _per_query_head(op.Clip(cand, _int(0), op.Squeeze(op.Sub(cols, _ints(1)), _ints(0))), q, hkv)
        index = op.Expand(index, op.Concat(_dims(q, 0, 3), _dims(cand, 3, 4), axis=0))   # [B, Hq, T, N]
        mask = op.Expand(attn_mask, op.Concat(_dims(q, 0, 3), cols, axis=0))             # [B, Hq, T, cols]
        picked = op.GatherElements(mask, index, axis=3)
        if attn_mask.dtype == onnx.TensorProto.BOOL:
            bias = op.Where(picked, _float(0.0), _float(float("-inf")))
        else:
            bias = op.Cast(picked, to=FLOAT)
        beyond = _per_query_head(op.GreaterOrEqual(cand, cols), q, hkv)
        bias = op.Where(beyond, _float(float("-inf")), bias)
    return op.Where(_per_query_head(op.Less(cand, _ints(0)), q, hkv), _float(float("-inf")), bias)


def _streaming_keep(positions, valid, capacity, sink):
    """Which candidates [B, Hkv, N] StreamingLLM keeps (policies.choose_kept with limit = capacity): the
    `sink` oldest are protected (key +inf), the others ranked by position. Among valid candidates only
    the protected ones tie (all kept, since sink < budget), so TopK's tie order cannot change the set."""
    n = _dims(positions, 2, 3)
    pos = op.Cast(positions, to=FLOAT)  # exact below 2^24 positions, as the reference
    key = pos
    if sink:
        k = op.Min(_ints(sink), n)
        smallest, _ = op.TopK(op.Where(valid, pos, _float(float("inf"))), k, axis=-1, largest=0, sorted=1)
        oldest = op.Gather(smallest, op.Sub(k, _ints(1)), axis=2)                  # [B, Hkv, 1]
        key = op.Where(op.LessOrEqual(pos, oldest), _float(float("inf")), pos)
    key = op.Where(valid, key, _float(float("-inf")))
    _, top = op.TopK(key, capacity, axis=-1, largest=1, sorted=1)
    chosen = op.ScatterElements(op.Expand(_float(0.0), op.Shape(key)), top,
                                op.Expand(_float(1.0), op.Shape(top)), axis=2)
    return op.And(op.Cast(chosen, to=onnx.TensorProto.BOOL), valid)


def _place(kept_old, kept_new, capacity):
    """policies.place: source candidate of every slot [B, Hkv, C] (< C: kept slot, C + j: new token j,
    -1: empty). Kept slots stay; kept new tokens fill the free slots in order."""
    free_rank = op.Sub(op.CumSum(op.Cast(op.Not(kept_old), to=INT64), _int(2)), _int(1))
    t = _dims(kept_new, 2, 3)
    # Kept new tokens first, each group in index order (TopK puts the lower index first among equals).
    _, new_order = op.TopK(op.Cast(kept_new, to=FLOAT), t, axis=-1, largest=1, sorted=1)
    n_new = op.ReduceSum(op.Cast(kept_new, to=INT64), _ints(2), keepdims=1)
    index = op.Clip(free_rank, _int(0), op.Squeeze(op.Sub(t, _ints(1)), _ints(0)))
    from_new = op.Add(op.GatherElements(new_order, index, axis=2), capacity)
    slot = op.Range(_int(0), op.Squeeze(capacity, _ints(0)), _int(1))
    return op.Where(kept_old, op.Expand(slot, op.Shape(kept_old)),
                    op.Where(op.Less(free_rank, n_new), from_new, _int(-1)))


def policy_update(q, k_new, v_new, pos, k_codes, k_params, v_codes, v_params, slot_pos, score, page_min, page_max,
                  attn_mask=None, is_causal: bool = False, scale: float = 1.0, options: str = "", layer: int = 0,
                  layers: int = 1, softcap: float = 0.0):
    """kvfx::policy_update for StreamingLLM with an integer budget (policies.policy_attend_reference):
    attention of q over the C slots (dequantized; empty ones masked) and the T new tokens, then the write.

    The store's C old slots are always candidates (the reference drops them when the store is empty:
    they are then all invalid and masked, which changes nothing). A call keeps up to C candidates: the
    reference's prompt limit min(C, budget) is C for an integer budget (C = min(cache length, budget)).
    """
    from kvfx.kernels.policies import PolicySpec

    spec = PolicySpec.parse(options)
    _refuse_softcap(softcap)
    if spec.policy not in _EXPORTED_POLICIES or spec.kv not in _TOKEN_CODECS or not isinstance(spec.budget, int):
        raise KVFXError(f"kvfx's ONNX export lowers policy 'streaming' with an integer budget and kv in "
                        f"{', '.join(_TOKEN_CODECS)}; got policy={spec.policy!r}, budget={spec.budget!r}, "
                        f"kv={spec.kv!r}")
    capacity = _dims(slot_pos, 2, 3)
    shape = op.Concat(_dims(k_new, 0, 3), axis=0)                                   # [B, Hkv, T]
    positions = op.Concat(op.Cast(slot_pos, to=INT64), op.Expand(op.Reshape(pos, _ints(1, 1, -1)), shape), axis=2)
    bias = _candidate_bias(attn_mask, is_causal, positions, pos, q)                # [B, Hq, T, N]
    keys, values = (op.Concat(_token_dequantize(codes, params, q, spec.kv, spec.group_size), op.CastLike(new, q),
                              axis=2)
                    for codes, params, new in ((k_codes, k_params, k_new), (v_codes, v_params, v_new)))
    out = op.Attention(q, keys, values, op.CastLike(bias, q), scale=scale)[0]
    # Valid: not empty and visible to the newest query of some query head of the KV head.
    last = op.Slice(bias, _ints(-1), _ints(2 ** 62), _ints(2))                     # [B, Hq, 1, N]
    seen = op.Cast(op.Greater(last, _float(float("-inf"))), to=FLOAT)
    seen = op.Reshape(seen, op.Concat(_dims(slot_pos, 0, 2), _ints(-1), _dims(positions, 2, 3), axis=0))
    valid = op.And(op.GreaterOrEqual(positions, _ints(0)), op.Greater(op.ReduceMax(seen, _ints(2), keepdims=0),
                                                                      _float(0.0)))
    kept = _streaming_keep(positions, valid, capacity, spec.sink)
    n = _dims(positions, 2, 3)
    source = _place(op.Slice(kept, _ints(0), capacity, _ints(2)), op.Slice(kept, capacity, n, _ints(2)), capacity)
    # store.write: every slot refilled from its source candidate (old slots first, then the new tokens).
    empty = op.Less(source, _int(0))
    cand = op.Max(source, _int(0))
    new_slot_pos = op.CastLike(op.Where(empty, _int(-1), op.GatherElements(positions, cand, axis=2)), slot_pos)
    scores = op.Concat(score, op.Expand(op.CastLike(_float(0.0), score), shape), axis=2)
    new_score = op.Where(empty, op.CastLike(_float(0.0), score), op.GatherElements(scores, cand, axis=2))
    stores = []
    for codes, params, new in ((k_codes, k_params, k_new), (v_codes, v_params, v_new)):
        new_codes, new_params = _token_quantize(op.CastLike(new, params), codes, params, spec.kv, spec.group_size)
        index = op.Unsqueeze(cand, _ints(3))
        gathered = []
        for old, fresh in ((codes, new_codes), (params, new_params)):
            if fresh is None:  # kv="none": params hold nothing ([B, H, C, 0])
                gathered.append(old)
                continue
            both = op.Concat(old, fresh, axis=2)
            gathered.append(op.GatherElements(both, op.Expand(index, op.Concat(_dims(cand, 0, 3), _dims(old, 3, 4),
                                                                              axis=0)), axis=2))
        stores.extend(gathered)
    return (out, *stores, new_slot_pos, new_score, page_min, page_max)


def translation_table() -> dict:
    import torch

    import kvfx.lowering.functional  # noqa: F401  (registers the export-only kvfx::*_update ops)

    return {
        torch.ops.kvfx.attend.default: attend,
        torch.ops.kvfx.store_update.default: store_update,
        torch.ops.kvfx.kivi_update.default: kivi_update,
        torch.ops.kvfx.kivi_attend.default: kivi_attend,
        torch.ops.kvfx.policy_update.default: policy_update,
    }
