"""`KVConfig`: the one validated description of what kvfx does to a model's KV cache.

`torch.compile(..., backend="kvfx", options={...})` hands `options` to the backend, which turns it into
a `KVConfig` before it looks at the graph: a bad option fails at compile time, before any tensor is
touched, with an error that names the option, the value and the valid choices.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from kvfx.kernels.formats import FORMAT_NAMES, format_for


class KVConfigError(ValueError):
    """An option given to kvfx is unknown or has a value kvfx does not accept."""


# Policies are added by the eviction/sparse-attention work; "none" keeps every token.
POLICIES = ("none",)


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
    policy:
        Which tokens are kept (``"none"``: all of them).
    strict:
        Raise instead of leaving an attention site that kvfx cannot prove it handles unchanged.
    """

    kv: str = "none"
    group_size: int = 32
    residual: int = 128
    policy: str = "none"
    strict: bool = False

    def __post_init__(self) -> None:
        _check_choice("kv", self.kv, FORMAT_NAMES)
        if not isinstance(self.group_size, int) or self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise KVConfigError(f"kvfx option 'group_size' got {self.group_size!r}; valid: a power of two >= 16 "
                                "(16, 32, 64, 128)")
        if not isinstance(self.residual, int) or self.residual < 0 or self.residual % self.group_size:
            raise KVConfigError(f"kvfx option 'residual' got {self.residual!r}; valid: a non-negative multiple "
                                f"of group_size={self.group_size} (e.g. 0, {self.group_size}, 128)")
        _check_choice("policy", self.policy, POLICIES)
        if not isinstance(self.strict, bool):
            raise KVConfigError(f"kvfx option 'strict' must be True or False, got {self.strict!r}")

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


    @property
    def format(self):
        """The storage format object (`kvfx.kernels.formats`), None for kv="none"."""
        return format_for(self.kv, self.group_size, self.residual)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KVConfigError(
            f"kvfx option {name!r} got {value!r}; valid choices: {', '.join(repr(c) for c in choices)}"
        )
