"""The ONNX translations of the kvfx ops (lowering/onnx_ops.py) against the PyTorch ops, in onnxruntime.

Given the same inputs, the exported cache writes produce bit-equal stores (same codes, scales, zeros,
rings) over a sequence of appends of mixed sizes, and attention agrees to float rounding."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import kvfx.lowering.functional  # noqa: F401  (kvfx::store_update, kvfx::kivi_update, kvfx::policy_update)
from kvfx.config import KVConfig
from kvfx.kernels.formats import format_for
from kvfx.lowering.onnx_ops import OPSET, translation_table

B, H, HQ, D, SLOTS = 2, 2, 4, 32, 100   # 100 slots: not a multiple of the group size
CHUNKS = [7, 1, 1, 18, 1, 33, 2, 1]      # a prompt, then decode steps and chunks crossing groups


class KiviStep(nn.Module):
    def __init__(self, bits, group_size, residual):
        super().__init__()
        self.format = (bits, False, group_size, residual)

    def forward(self, q, k, v, pos, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring):
        store = (k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring)
        store = torch.ops.kvfx.kivi_update(*store, pos, k, v, SLOTS, *self.format)
        out = torch.ops.kvfx.kivi_attend(q, k, v, pos, *store, None, -1, SLOTS, False, 0.2, *self.format)
        return (out, *store)


class Int8Step(nn.Module):
    def forward(self, q, k, v, pos, k_codes, k_qparams, v_codes, v_qparams):
        k_codes, k_qparams = torch.ops.kvfx.store_update(k_codes, k_qparams, pos, k)
        v_codes, v_qparams = torch.ops.kvfx.store_update(v_codes, v_qparams, pos, v)
        out = torch.ops.kvfx.attend(q, k_codes, v_codes, k_qparams, v_qparams, None, -1, False, 0.2)
        return out, k_codes, k_qparams, v_codes, v_qparams


class PolicyStep(nn.Module):
    """kvfx::policy_update with the model's mask given as a bool [1, 1, T, SLOTS] (causal) or absent."""

    def __init__(self, options: str, masked: bool):
        super().__init__()
        self.options, self.masked = options, masked

    def forward(self, q, k, v, pos, k_codes, k_params, v_codes, v_params, slot_pos, score, page_min, page_max):
        store = (k_codes, k_params, v_codes, v_params, slot_pos, score, page_min, page_max)
        mask = torch.arange(SLOTS)[None, None, None] <= pos[None, None, :, None] if self.masked else None
        return torch.ops.kvfx.policy_update(q, k, v, pos, *store, mask, not self.masked, 0.2, self.options, 0, 1)


def export(module, store, path):
    t = torch.export.Dim("t", min=1, max=SLOTS)
    args = (torch.randn(B, HQ, 3, D), torch.randn(B, H, 3, D), torch.randn(B, H, 3, D), torch.arange(3), *store)
    shapes = ({2: t}, {2: t}, {2: t}, {0: t}, *(None for _ in store))
    program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=shapes,
                                custom_translation_table=translation_table(), verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, [i.name for i in session.get_inputs()]


def run_chunks(module, store, path, positions=None, live=None):
    """Append CHUNKS through the exported graph and through the PyTorch module; compare after each
    (where live(store) is given, store tensors only on the slots it says hold a token)."""
    session, names = export(module, store, path)
    ours, theirs = [t.numpy() for t in store], list(store)
    gen, start = torch.Generator().manual_seed(0), 0
    for t in CHUNKS:
        q, k, v = (torch.randn(B, h, t, D, generator=gen) for h in (HQ, H, H))
        pos = torch.arange(start, start + t) if positions is None else positions(start, t)
        out, *ours = session.run(None, dict(zip(names, [q.numpy(), k.numpy(), v.numpy(), pos.numpy(), *ours])))
        expected, *theirs = module(q, k, v, pos, *theirs)
        keep = None if live is None else live([t.numpy() for t in theirs])
        for a, b in zip(ours, theirs):
            b = b.numpy()
            if keep is not None and a.shape[:3] == keep.shape:
                a, b = a[keep], b[keep]
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(out, expected.numpy(), atol=2e-5, rtol=1e-5)
        start += t


@pytest.mark.parametrize("bits,group_size,residual", [(4, 16, 16), (2, 16, 0), (4, 32, 32)])
def test_kivi_write_and_attend_match_pytorch(bits, group_size, residual, tmp_path):
    fmt = format_for(f"int{bits}", group_size, residual)
    store = fmt.allocate((B, H, SLOTS, D), torch.float32, torch.device("cpu")).tensors()
    run_chunks(KiviStep(bits, group_size, residual), store, tmp_path / "kivi.onnx")


def test_int8_write_at_any_positions_and_attend_match_pytorch(tmp_path):
    store = format_for("int8").allocate((B, H, SLOTS, D), torch.float32, torch.device("cpu")).tensors()
    # store_write's contract allows any distinct positions, not only an append.
    run_chunks(Int8Step(), store, tmp_path / "int8.onnx",
               positions=lambda start, t: torch.randperm(SLOTS, generator=torch.Generator().manual_seed(start))[:t])


@pytest.mark.parametrize("kv,masked", [("none", False), ("int8", True), ("int4", False), ("int2", True)])
def test_streaming_policy_matches_pytorch(kv, masked, tmp_path):
    """StreamingLLM keeping 24 of 64 tokens: chunks of 18 and 33 after a prompt evict (the general path),
    single tokens take the decode path. Empty slots hold garbage that differs (the decode path leaves
    it, the general path copies a candidate), so the store is compared on the slots holding a token."""
    config = KVConfig(kv=kv, group_size=16, policy="streaming", budget=24, sink=4)
    store = config.format.allocate((B, H, SLOTS, D), torch.float32, torch.device("cpu")).tensors()
    assert store[4].shape[-1] == 24
    run_chunks(PolicyStep(config.to_json(), masked), store, tmp_path / "streaming.onnx", live=lambda s: s[4] >= 0)
