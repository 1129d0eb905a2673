"""Backend selection for the unigrpo_kernels ops: one explicit function, decided by the caller, logged once.

Backends: "torch" (the reference math in kernels/reference, any device), "triton" (kernels/triton: CUDA
devices, or CPU tensors when TRITON_INTERPRET=1 is set — the interpreter, for tests only) and "cuda"
(kernels/cuda, a ctypes-loaded library built by CMake: CUDA devices only). Each op declares the backends it
implements (`OP_BACKENDS`); "auto" picks the first available of them in `_AUTO_ORDER` (fastest first), and
never picks the Triton interpreter (so on CPU "auto" is always "torch"). On a CUDA device, "auto" passing
over a faster backend the op has (the CUDA library not built or not loadable, triton missing) warns once
(RuntimeWarning and logger.warning, with the reason): the CUDA library is built locally and git-ignored, so
a fresh checkout would otherwise run the Triton path without anyone noticing. An explicit name that the op lacks,
or that is unavailable on the device, is an error naming both. No import-time magic: callers pass the name
(from their config) and get a plain string back; tests force each backend by name.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from typing import Callable, Sequence

import torch

__all__ = ["resolve_backend", "resolve_request", "available_backends", "KNOWN_BACKENDS", "OP_BACKENDS", "triton_interpreted"]

logger = logging.getLogger(__name__)

KNOWN_BACKENDS = ("torch", "triton", "cuda")
_AUTO_ORDER = ("cuda", "triton", "torch")
# op name -> the backends that implement it
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "sde_step": ("torch", "triton", "cuda"),
    "flow_grpo_loss": ("torch", "triton", "cuda"),
    "token_logprobs": ("torch", "triton"),
    "text_grpo_loss": ("torch", "triton"),
}
_logged: set[tuple] = set()


def _as_device(device) -> torch.device | None:
    return None if device is None else torch.device(device)


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_ok(dev: torch.device | None) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if dev is None:
        return torch.cuda.is_available() or triton_interpreted()
    if dev.type == "cuda":
        return not triton_interpreted()
    return dev.type == "cpu" and triton_interpreted()


def _cuda_ok(dev: torch.device | None) -> bool:
    if not torch.cuda.is_available() or (dev is not None and dev.type != "cuda"):
        return False
    from .cuda_lib import cuda_library_available

    return cuda_library_available()


# name -> probe(device) -> bool
_PROBES: dict[str, Callable[[torch.device | None], bool]] = {
    "torch": lambda dev: True, "triton": _triton_ok, "cuda": _cuda_ok}


def _why_unavailable(name: str, dev: torch.device | None) -> str:
    """One line: why backend `name` is unavailable on `dev` (never raises)."""
    if name == "cuda":
        try:
            from .cuda_lib import cuda_library_status

            return cuda_library_status(dev)
        except Exception as err:  # noqa: BLE001 - a status line must not break backend selection
            return f"status unknown ({type(err).__name__}: {err})"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return "TRITON_INTERPRET=1 is set (the interpreter never runs CUDA tensors)" if triton_interpreted() else \
            "not usable on this device"
    return "unavailable"


def available_backends(device=None, op: str | None = None) -> list[str]:
    """The backends usable on `device` (None = no device constraint) for `op` (None = any op), in
    auto-preference order."""
    dev = _as_device(device)
    implemented = OP_BACKENDS[op] if op is not None else KNOWN_BACKENDS
    return [name for name in _AUTO_ORDER if name in implemented and _PROBES[name](dev)]


def resolve_request(name, *, kind: str, known: Sequence[str], choose: Callable[[str], str], where: str,
                    logged: set, log: logging.Logger, note: Callable[[str], str] = lambda chosen: "") -> str:
    """The one skeleton of every backend switch (the fused ops' here, attention's in unigrpo.model.attention):
    `name` ("auto" or one of `known`, any case and spacing) → choose(request) → the concrete backend, logged
    once per (request, where, choice) into `logged` through `log`, with note(choice) appended. A ValueError names a bad request and what
    is allowed; `choose` raises one for a known backend that cannot run `where`."""
    if not isinstance(name, str):
        raise ValueError(f"{kind} backend must be a string, got {name!r}")
    req = name.strip().lower()
    if req != "auto" and req not in known:
        raise ValueError(f"unknown {kind} backend {name!r}; expected 'auto' or one of {', '.join(known)}")
    chosen = choose(req)
    key = (req, where, chosen)
    if key not in logged and not torch.compiler.is_compiling():   # logging does not trace under dynamo
        logged.add(key)
        log.info("unigrpo %s: backend %r on %s -> %s%s", kind, req, where, chosen, note(chosen))
    return chosen


def resolve_backend(name: str = "auto", device=None, op: str | None = None) -> str:
    """Resolve a backend request ("auto" | "torch" | "triton" | "cuda") for `op` on `device` to a concrete
    available backend name. Raises ValueError for an unknown name, a backend the op does not implement, or
    one unavailable on the device."""
    if op is not None and op not in OP_BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OP_BACKENDS)}")
    dev = _as_device(device)
    implemented = OP_BACKENDS[op] if op is not None else KNOWN_BACKENDS

    def choose(req: str) -> str:
        if op is not None and req != "auto" and req not in implemented:
            raise ValueError(f"op {op} has no {req!r} backend; it has {', '.join(implemented)}")
        avail = available_backends(dev, op)
        if req in avail:
            return req
        if req != "auto":
            hint = (" (Triton runs on CPU tensors only in the interpreter: set TRITON_INTERPRET=1 before importing "
                    "triton)" if req == "triton" and (dev is None or dev.type == "cpu") else "")
            raise ValueError(f"kernel backend {req!r} is not available on device {dev}"
                             f"{' for ' + op if op else ''}; available: {', '.join(avail)}{hint}")
        native = [b for b in avail if not (b == "triton" and (dev is None or dev.type != "cuda"))]
        chosen = native[0] if native else "torch"
        on_gpu = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
        passed = [b for b in _AUTO_ORDER[:_AUTO_ORDER.index(chosen)] if b in implemented and b not in avail]
        key = ("fallback", str(dev), op, chosen)
        if on_gpu and passed and key not in _logged and not torch.compiler.is_compiling():
            _logged.add(key)
            msg = (f"unigrpo_kernels: backend 'auto' for {op or 'ops'} on {dev or 'cuda'} falls back to {chosen!r}: "
                   + "; ".join(f"{b} {_why_unavailable(b, dev)}" for b in passed))
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return chosen

    return resolve_request(name, kind="kernel", known=KNOWN_BACKENDS, choose=choose, logged=_logged, log=logger,
                           where=f"device {dev}" + (f" for {op}" if op else ""))
