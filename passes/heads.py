"""Attention written over 3-D tensors, the heads merged into the batch (BLOOM, the BART family, XGLM):

    q3, k3, v3 = (x.reshape(B * H, -1, D) for x in (q, k, v))            # x [B, H, N, D]
    scores = torch.bmm(q3, k3.transpose(1, 2))            # or bias.baddbmm(q3, k3^T, beta=b, alpha=a)
    scores = scores.view(B, H, T, S) + mask               # head views may come and go around mask terms
    out = torch.bmm(softmax(scores).view(B * H, T, S), v3)             # [B * H, T, D]

A reshape keeps the row-major order of the elements, so merging [B, H] into B * H maps (b, h) to
row b * H + h and splitting B * H into [B, H] maps it back: the shapes alone prove what a view
does, however it was spelled. The 3-D attention is therefore the 4-D attention over q, k, v with
its output flattened: kvfx attends over the 4-D tensors and flattens (`Site.merged_output`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from kvfx.passes.fx_utils import call_arguments, is_function, is_method, same_shape, shape_of

_VIEWS = ("view", "reshape", "flatten", "unflatten")


def is_view(node: Any) -> bool:
    return is_method(node, *_VIEWS) or is_function(node, torch.reshape, torch.flatten, torch.unflatten)


def merged_heads(node: Any) -> fx.Node | None:
    """x for a view of a 4-D x [B, H, N, D] as [B * H, N, D]; None for anything else."""
    if not is_view(node) or not isinstance(node.args[0], fx.Node):
        return None
    before, after = shape_of(node.args[0]), shape_of(node)
    if before is None or after is None or len(before) != 4 or len(after) != 3:
        return None
    return node.args[0] if same_shape(after, (before[0] * before[1], before[2], before[3])) else None


def split_heads(node: Any) -> tuple[fx.Node, Any] | None:
    """(x, H) for a view of a 3-D x [B * H, T, S] as [B, H, T, S]; None for anything else."""
    if not is_view(node) or not isinstance(node.args[0], fx.Node):
        return None
    before, after = shape_of(node.args[0]), shape_of(node)
    if before is None or after is None or len(before) != 3 or len(after) != 4:
        return None
    return (node.args[0], after[1]) if same_shape(before, (after[0] * after[1], after[2], after[3])) else None


def is_bmm(node: Any) -> bool:
    return is_function(node, torch.bmm) or is_method(node, "bmm")


def is_baddbmm(node: Any) -> bool:
    return is_function(node, torch.baddbmm) or is_method(node, "baddbmm")


def baddbmm_arguments(node: fx.Node) -> dict[str, Any]:
    """input, batch1, batch2, beta, alpha of `input.baddbmm(...)` or `torch.baddbmm(...)`:
    beta * input + alpha * (batch1 @ batch2)."""
    args = call_arguments(node, ("input", "batch1", "batch2"))
    args.setdefault("beta", 1)
    args.setdefault("alpha", 1)
    return args
