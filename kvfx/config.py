"""`KVConfig`: the one validated description of what kvfx does to a model's KV cache.

`torch.compile(..., backend="kvfx", options={...})` hands `options` to the backend, which turns it into
a `KVConfig` before it looks at the graph: a bad option fails at compile time, before any tensor is
touched, with an error that names the option, the value and the valid choices.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

from kvfx.kernels.formats import FORMAT_NAMES, STORE_LAYOUT, format_from_json
from kvfx.kernels.policies import POLICIES


class KVConfigError(ValueError):
    """An option given to kvfx is unknown or has a value kvfx does not accept."""


@dataclass(frozen=True)
class KVConfig:
    """What kvfx does to each attention site's KV cache.

    Attributes
    ----------
    kv:
        Storage format of the cache: ``"none"`` keeps the model's dtype (lossless), ``"int8"``
        stores 8-bit codes with one (scale, zero) per token per KV head (`kvfx.kernels.int8`);
        ``"int4"``, ``"int2"`` are KIVI (keys per channel over groups of `group_size` tokens, values
        per token over groups of `group_size` channels, the last `residual` tokens in the model
        dtype) and ``"fp8"`` is e4m3 with per-head scales (`kvfx.kernels.kivi`).
    group_size, residual:
        KIVI's G and R (paper defaults 32 and 128). G: a power of two >= 16 dividing the head dim;
        R: a multiple of G.
    policy, budget:
        Which tokens are kept and read (`kvfx.kernels.policies`): ``"none"`` (all), ``"streaming"``
        (the first `sink` tokens + the most recent), ``"h2o"`` (the `recent` newest + the highest
        attention accumulated over the queries so far: `h2o_score` ``"mean"`` per query that has seen
        the token, as kvpress's ObservedAttentionPress ranks, or ``"sum"``, the H2O paper's, which
        favours old tokens: token i of a T-token prompt is summed over T - i queries),
        ``"snapkv"`` / ``"pyramidkv"`` (the prompt tokens the last `window` prompt queries attend to
        most, `pooling` ("max"/"avg") over windows of `pool_kernel` position neighbours, so a kept token
        keeps its neighbours (SnapKV's kernel_size: 7 in the paper; kvfx's 9 keeps a 5-digit passkey
        whole after its anchor word, docs/ARCHITECTURE.md); PyramidKV shrinks the budget with depth by
        `beta`), ``"quest"`` (keeps all, reads the top `pages` pages of `page_size` tokens per decode
        step, ranked by their bound max-pooled over `page_pool` neighbouring pages, so a key that
        straddles a page boundary is read whole; 1: the paper's ranking; `page_bounds` ``"model"`` keeps
        the pages' key bounds in the model dtype, ``"fp8"`` in e4m3 rounded outward, so they stay bounds
        (of keys within +-448, e4m3's range): half the bytes each step's page scoring reads and half
        Quest's memory over the cache, for a slightly coarser ranking). `budget`: tokens kept per
        layer and KV head, a count (int) or a fraction of the prompt (float in (0, 1]); eviction
        policies need one.
    strict:
        Raise instead of leaving an attention site that kvfx cannot prove it handles unchanged.
    cudagraphs:
        Replay decode-step graphs (every attention site one query token) on CUDA as CUDA graphs
        (inductor's cudagraph trees, the kvfx stores marked as static inputs): removes the per-op
        launch and Python cost, which dominates a decode step at small batch. Prompt graphs run
        normally. Like ``mode="reduce-overhead"``, outputs are overwritten by the next replay.
    """

    kv: str = "none"
    group_size: int = 32
    residual: int = 128
    policy: str = "none"
    budget: int | float | None = None
    sink: int = 4
    recent: int | None = None
    h2o_score: str = "mean"
    window: int = 32
    pooling: str = "max"
    pool_kernel: int = 9
    beta: float = 20.0
    page_size: int = 16
    pages: int | float = 0.125
    page_pool: int = 3
    page_bounds: str = "model"
    strict: bool = False
    cudagraphs: bool = False

    def __post_init__(self) -> None:
        _check_choice("kv", self.kv, FORMAT_NAMES)
        if not isinstance(self.group_size, int) or self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise KVConfigError(f"kvfx option 'group_size' got {self.group_size!r}; valid: a power of two >= 16 "
                                "(16, 32, 64, 128)")
        if not isinstance(self.residual, int) or self.residual < 0 or self.residual % self.group_size:
            raise KVConfigError(f"kvfx option 'residual' got {self.residual!r}; valid: a non-negative multiple "
                                f"of group_size={self.group_size} (e.g. 0, {self.group_size}, 128)")
        _check_choice("policy", self.policy, POLICIES)
        self._check_policy()
        for flag in ("strict", "cudagraphs"):
            if not isinstance(getattr(self, flag), bool):
                raise KVConfigError(f"kvfx option '{flag}' must be True or False, got {getattr(self, flag)!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "KVConfig" | None) -> "KVConfig":
        """Build a config from the ``options=`` dict of `torch.compile` (or pass a config through)."""
        if options is None:
            return cls()
        if isinstance(options, KVConfig):
            return options
        if not isinstance(options, Mapping):
            raise KVConfigError(f"kvfx options must be a dict, got {type(options).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise KVConfigError(
                f"unknown kvfx option {unknown[0]!r}; valid options: {', '.join(known)}"
            )
        return cls(**options)

    def _check_policy(self) -> None:
        if self.budget is not None and not _is_budget(self.budget):
            raise KVConfigError(f"kvfx option 'budget' got {self.budget!r}; valid: a token count >= 1 (e.g. 1024) "
                                "or a fraction of the prompt in (0, 1] (e.g. 0.2)")
        if self.policy in ("streaming", "h2o", "snapkv", "pyramidkv") and self.budget is None:
            raise KVConfigError(f"kvfx policy {self.policy!r} needs option 'budget': a token count (e.g. 1024) "
                                "or a fraction of the prompt (e.g. 0.2)")
        for name in ("sink", "window", "page_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < (0 if name == "sink" else 1):
                raise KVConfigError(f"kvfx option {name!r} got {value!r}; valid: an integer >= "
                                    f"{0 if name == 'sink' else 1}")
        if self.recent is not None and (not _is_int(self.recent) or self.recent < 0):
            raise KVConfigError(f"kvfx option 'recent' got {self.recent!r}; valid: an integer >= 0, or None "
                                "(half the budget)")
        _check_choice("pooling", self.pooling, ("max", "avg"))
        _check_choice("h2o_score", self.h2o_score, ("mean", "sum"))
        if not _is_int(self.pool_kernel) or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise KVConfigError(f"kvfx option 'pool_kernel' got {self.pool_kernel!r}; valid: an odd integer >= 1 "
                                "(SnapKV: 5 or 7; 1: no pooling)")
        if not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool) or self.beta < 1:
            raise KVConfigError(f"kvfx option 'beta' got {self.beta!r}; valid: a number >= 1 (PyramidKV: 20)")
        if not _is_int(self.page_pool) or self.page_pool < 1 or self.page_pool % 2 == 0:
            raise KVConfigError(f"kvfx option 'page_pool' got {self.page_pool!r}; valid: an odd integer >= 1 "
                                "(1: Quest's own ranking, 3: the default)")
        _check_choice("page_bounds", self.page_bounds, ("model", "fp8"))
        if not _is_budget(self.pages):
            raise KVConfigError(f"kvfx option 'pages' got {self.pages!r}; valid: a page count >= 1 or a "
                                "fraction of the cache's pages in (0, 1] (e.g. 0.125)")
        if _is_int(self.budget):  # a token budget must leave room for the tokens the policy promises to keep
            kept = {"streaming": ("sink", self.sink), "h2o": ("recent", self.recent),
                    "snapkv": ("window", self.window), "pyramidkv": ("window", self.window)}.get(self.policy)
            if kept and kept[1] is not None and kept[1] >= self.budget + (kept[0] != "sink"):
                raise KVConfigError(f"kvfx option {kept[0]!r}={kept[1]} does not fit budget={self.budget} of "
                                    f"policy {self.policy!r}; valid: {kept[0]} < budget"
                                    f"{'' if kept[0] == 'sink' else ' or equal'}")

    @property
    def format(self):
        """The storage format object (`kvfx.kernels.formats`), None for kv="none" without a policy."""
        return format_from_json(self.to_json())

    @property
    def summary(self) -> str:
        """What is done to the cache, in a few words: "int4", "int4 + snapkv (budget 0.2)"."""
        if self.policy == "none":
            return self.kv
        return f"{self.kv} + {self.policy}" + (f" (budget {self.budget})" if self.budget is not None else
                                               f" (pages {self.pages})")

    def to_json(self) -> str:
        """The options as a string: how the kvfx ops of a rewritten graph receive them (with the store
        layout's version, so a graph cached for another layout is not reused)."""
        return json.dumps({**dataclasses.asdict(self), "store_layout": STORE_LAYOUT}, sort_keys=True)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_budget(x: Any) -> bool:
    if _is_int(x):
        return x >= 1
    return isinstance(x, float) and 0 < x <= 1


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KVConfigError(
            f"kvfx option {name!r} got {value!r}; valid choices: {', '.join(repr(c) for c in choices)}"
        )
