"""What onnxruntime (CPU) really executes, for the choices in lowering/onnx_ops.py. If a newer
onnxruntime changes one of these facts, the test says which choice to revisit."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h


def session(node, inputs, output_type, opset):
    graph = h.make_graph([node], "g", inputs, [h.make_tensor_value_info("o", output_type, None)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_attention_runs_gqa_with_a_bool_mask_at_opset_23():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 4, 3, 16), (1, 2, 8, 16), (1, 2, 8, 16)))
    mask = np.tril(np.ones((3, 8), bool), k=5)[None, None]
    node = h.make_node("Attention", ["q", "k", "v", "m"], ["o"], scale=0.25)
    inputs = [h.make_tensor_value_info(n, T.FLOAT, None) for n in "qkv"] + [h.make_tensor_value_info("m", T.BOOL, None)]
    (out,) = session(node, inputs, T.FLOAT, 23).run(None, dict(q=q, k=k, v=v, m=mask))
    # Query head h reads KV head h // 2: HF's repeat_kv order.
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), *(torch.from_numpy(x).repeat_interleave(2, 1) for x in (k, v)),
        attn_mask=torch.from_numpy(mask), scale=0.25)
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("op", ["Gather", "ScatterElements", "TensorScatter"])
def test_a_uint4_cache_cannot_be_updated_in_graph(op):
    """Why kvfx keeps packed uint8 codes and unpacks them with BitShift/BitwiseAnd."""
    extra = {"Gather": ["i"], "ScatterElements": ["i", "u"], "TensorScatter": ["u", "w"]}[op]
    types = {"i": T.INT64, "u": T.UINT4, "w": T.INT64}
    inputs = [h.make_tensor_value_info("x", T.UINT4, [1, 1, 4, 8])] + [
        h.make_tensor_value_info(n, types[n], None) for n in extra]
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|INVALID_GRAPH"):
        session(h.make_node(op, ["x", *extra], ["o"], **({"axis": 2} if op != "TensorScatter" else {})),
                inputs, T.UINT4, 24)


@pytest.mark.parametrize("kind,opset,runs", [(T.UINT4, 21, True), (T.UINT2, 21, False), (T.UINT2, 25, True)])
def test_blocked_dequantize_linear_needs_opset_21_for_4_bits_and_25_for_2_bits(kind, opset, runs):
    values = np.arange(32) % (16 if kind == T.UINT4 else 4)
    codes = h.make_tensor("x", kind, (4, 8), values.tolist())
    node = h.make_node("DequantizeLinear", ["x", "s"], ["o"], axis=1, block_size=4)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("s", T.FLOAT, None)],
                         [h.make_tensor_value_info("o", T.FLOAT, None)], initializer=[codes])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)]).SerializeToString()
    scale = np.full((4, 2), 0.5, np.float32)
    if not runs:
        with pytest.raises(Exception, match="INVALID_GRAPH"):
            ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        return
    (out,) = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"s": scale})
    np.testing.assert_array_equal(out, values.reshape(4, 8) * 0.5)
