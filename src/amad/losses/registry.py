"""Losses found by name, so that configs stay plain data (name + options)."""

from __future__ import annotations

from typing import Any, Callable

from .base import AttentionLoss

_REGISTRY: dict[str, Callable[..., AttentionLoss]] = {}


def register(name: str) -> Callable[[Callable[..., AttentionLoss]], Callable[..., AttentionLoss]]:
    """Class decorator: make a loss available as ``get(name)``."""

    def deco(factory: Callable[..., AttentionLoss]) -> Callable[..., AttentionLoss]:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def get(name: str, **options: Any) -> AttentionLoss:
    """Return a new instance of the loss registered as ``name`` (options go to its constructor)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown attention loss {name!r}; available: {', '.join(available())}") from None
    return factory(**options)


def missing_options(name: str, options: dict[str, Any]) -> dict[str, str]:
    """The required options of loss ``name`` not in ``options``, each with its ``option_help`` (or "")."""
    import inspect

    factory = _REGISTRY[name]
    required = [
        p.name for p in inspect.signature(factory).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    hints = getattr(factory, "option_help", {})
    return {option: hints.get(option, "") for option in required if option not in options}


def available() -> list[str]:
    """Names of all registered losses, sorted."""
    return sorted(_REGISTRY)
