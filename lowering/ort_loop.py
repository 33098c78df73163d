"""Greedy generation with onnxruntime over a graph from `kvfx.export_onnx` (numpy + onnxruntime only).

Between steps the loop holds the logits it needs and the cache tensors the graph returned, nothing
else: for a kvfx-quantized export those are the compressed store (packed codes, scales, zeros,
residual rings), whose sizes `cache_bytes` reports.

    gen = OrtGenerator("model.onnx")
    tokens = gen.generate(prompt_ids, max_new_tokens=32)        # prompt_ids: int64 [B, P]
"""
from __future__ import annotations

import json
import os

import numpy as np

METADATA_KEY = "kvfx.cache"  # JSON list of {name, shape, dtype, fill}: the cache inputs, in order


class OrtGenerator:
    def __init__(self, path: str | os.PathLike, providers=("CPUExecutionProvider",), threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.fspath(path), options, providers=list(providers))
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not a graph from kvfx.export_onnx")
        self.cache_spec = json.loads(metadata[METADATA_KEY])
        self.cache_names = [t["name"] for t in self.cache_spec]
        self.cache: list[np.ndarray] = []

    def new_cache(self) -> list[np.ndarray]:
        """The cache before the first step (what the model's empty cache holds)."""
        return [np.full(t["shape"], t["fill"], dtype=t["dtype"]) for t in self.cache_spec]

    def step(self, input_ids: np.ndarray, past_len: int, cache: list[np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run input_ids [B, T] at positions past_len .. past_len + T - 1: (logits [B, T, V], new cache)."""
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "past_len": np.array(past_len, dtype=np.int64)}
        feeds.update(zip(self.cache_names, cache))
        logits, *cache = self.session.run(None, feeds)
        return logits, cache

    def generate(self, prompt: np.ndarray, max_new_tokens: int, on_token=None) -> np.ndarray:
        """Greedy tokens [B, P + max_new_tokens]: the prompt, then one graph run per new token after
        the prefill. on_token(i) is called after each new token (timing hooks)."""
        prompt = np.asarray(prompt, dtype=np.int64)
        logits, self.cache = self.step(prompt, 0, self.new_cache())
        tokens = [prompt]
        for i in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(token)
            if on_token is not None:
                on_token(i)
            if i + 1 < max_new_tokens:
                logits, self.cache = self.step(token, prompt.shape[1] + i, self.cache)
        return np.concatenate(tokens, axis=1)

    def cache_bytes(self) -> int:
        """Bytes of the cache tensors held between steps (after `generate`)."""
        return sum(a.nbytes for a in self.cache)
