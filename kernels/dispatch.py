"""Backend selection for the unigrpo_kernels ops: one explicit function, decided by the caller, logged once.

Backends: "torch" (the reference math in kernels/reference, any device) is available now; "triton" and
"cuda" are known names whose availability probes are added with their kernels (register them in
`_PROBES`). "auto" picks the first available backend in `_AUTO_ORDER` (fastest first), so today it
resolves to "torch". No import-time magic: callers pass the name (from their config or an environment
variable they read) and get a plain string back; tests force each backend by name.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

__all__ = ["resolve_backend", "available_backends", "KNOWN_BACKENDS"]

logger = logging.getLogger(__name__)

KNOWN_BACKENDS = ("torch", "triton", "cuda")
_AUTO_ORDER = ("cuda", "triton", "torch")
# name -> probe(device) -> bool. Only backends whose code exists are registered.
_PROBES: dict[str, Callable[[torch.device | None], bool]] = {"torch": lambda device: True}
_logged: set[tuple[str, str, str]] = set()


def _as_device(device) -> torch.device | None:
    return None if device is None else torch.device(device)


def available_backends(device=None) -> list[str]:
    """The backends usable on `device` (None = no device constraint), in auto-preference order."""
    dev = _as_device(device)
    return [name for name in _AUTO_ORDER if name in _PROBES and _PROBES[name](dev)]


def resolve_backend(name: str = "auto", device=None) -> str:
    """Resolve a backend request ("auto" | "torch" | "triton" | "cuda") for `device` to a concrete
    available backend name. Raises ValueError for an unknown name or an unavailable backend."""
    if not isinstance(name, str):
        raise ValueError(f"backend name must be a string, got {name!r}")
    req = name.strip().lower()
    if req != "auto" and req not in KNOWN_BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected 'auto' or one of {', '.join(KNOWN_BACKENDS)}")
    dev = _as_device(device)
    avail = available_backends(dev)
    if req == "auto":
        chosen = avail[0]
    elif req in avail:
        chosen = req
    else:
        raise ValueError(f"kernel backend {req!r} is not available on device {dev}; "
                         f"available: {', '.join(avail)}")
    key = (req, str(dev), chosen)
    if key not in _logged:
        _logged.add(key)
        logger.info("unigrpo_kernels: backend %r on device %s -> %s", req, dev, chosen)
    return chosen
