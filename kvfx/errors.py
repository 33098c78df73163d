"""kvfx's runtime error type (bad options raise `kvfx.KVConfigError` instead)."""


class KVFXError(RuntimeError):
    """kvfx cannot do what was asked without risking wrong results; the message says why."""
