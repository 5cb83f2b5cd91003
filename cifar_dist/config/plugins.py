"""User code named in the config: ``"package.module:name"`` (a callback class, a model factory)."""

from __future__ import annotations

import importlib

from cifar_dist.errors import ConfigError


def is_spec(text: str) -> bool:
    """Whether ``text`` names user code (``package.module:name``) rather than a built-in."""
    module, sep, attr = text.partition(":")
    return bool(sep and module and attr)


def require_trust(model_name: str, source, trust_code: bool) -> None:
    """Refuse user code named in ``model.name`` of a received config (``source``) unless trusted."""
    if is_spec(model_name) and not trust_code:
        module = model_name.partition(":")[0]
        raise ConfigError(
            f"{source}: model.name {model_name[:80]!r} would import and run module {module[:60]!r}; "
            "pass --trust-code (load_model(..., trust_code=True)) if you trust it"
        )


def import_object(spec: str, key: str):
    """The object ``spec`` names; any failure is a ConfigError naming ``key`` and ``spec``."""
    if not is_spec(spec):
        raise ConfigError(f"{key}: {spec!r} is not of the form package.module:name")
    module, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # ImportError, or the user's module failed while importing
        raise ConfigError(f"{key}: cannot import {module!r} for {spec!r}: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: {module!r} has no {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj
