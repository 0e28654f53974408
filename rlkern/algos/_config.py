"""Reading a trainer's config object: verl passes dataclass configs with ``.get``, OmegaConf
DictConfigs and plain dicts; any of them, or None, is read the same way."""

from __future__ import annotations


def config_get(config, key: str, default=None, *, none_is_default: bool = False):
    """``config[key]`` (via ``.get`` or the attribute), ``default`` when config is None or lacks
    the key; with ``none_is_default`` also when the value is None (verl's ``x if x is not None
    else default`` fields)."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    value = getter(key, default) if getter is not None else getattr(config, key, default)
    return default if none_is_default and value is None else value
