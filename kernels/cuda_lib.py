"""ctypes binding of the CUDA backend: loads libunigrpo_cuda.so (built by CMake from kernels/cuda/*.cu) and
exposes the low-level flow functions that kernels/flow.py wraps in custom ops (ALGORITHM.md §3, §7, §8):

    sde_step_fwd(x_BD, v_BD, xi_BD, a_B, b_B, std_B, want_mean) -> (x_next_BD, sqsum_B, mean_BD | None)
    flow_sums_fwd(v_BD, xi_BD, v_old_BD, v_ref_BD)              -> sums_B3
    flow_sums_bwd(g_B3, v_BD, xi_BD, v_old_BD, v_ref_BD, use_old, use_ref) -> dv_BD

Shape legend: B rows, D latent elements per row. The math is kernels/reference/flow.py (`sde_step`'s
per-element part, `flow_row_sums` and its gradient); kernels/cuda/flow.cu says how the kernels compute it.

Decisions:
- Where the library is looked for, first found wins: $UNIGRPO_CUDA_LIB when set (then nothing else: an
  explicit path that does not load is reported, not silently replaced); the package's own cuda/ folder
  (unigrpo_kernels/cuda/libunigrpo_cuda.so: setup.py's build_py copies it there for `pip install .`, and
  into the source tree's kernels/cuda/ for `pip install -e .`); and, in a source checkout, the CMake
  default build/cuda/lib/ (`cmake -S . -B build/cuda && cmake --build build/cuda`).
- `cuda_library_available()` never raises and caches its answer: False without a CUDA device, without the
  library, with a library of another ABI version, or when the library has no code for the device (the
  probe asks the CUDA runtime for a kernel's attributes on that device). `cuda_library_status()` says why.
- The three functions validate every argument (a ValueError naming the argument and the bad value: type,
  dimensions, shape, dtype, contiguity, device) before touching the GPU, allocate outputs and the
  reduction workspace with torch (so the caching allocator and CUDA-graph capture work), and launch on
  torch's current stream of the tensors' device. The C functions only enqueue work: no host sync.
- The chunk count (blocks per row) comes from the library's planner (`unigrpo_flow_num_chunks`) so its
  constants live in one place; the results are bit-reproducible for a given device, shape, dtype and
  pointer alignment (see flow.cu). Keyword-only `chunks`, `out` and `workspace` exist for tests (force a
  chunk count; write into caller-poisoned buffers); the custom ops never pass them.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

from .dtypes import KERNEL_DTYPES

__all__ = ["cuda_library_available", "cuda_library_status", "library_candidates", "sde_step_fwd", "flow_sums_fwd",
           "flow_sums_bwd", "LIB_NAME", "ENV_VAR", "ABI_VERSION"]

LIB_NAME = "libunigrpo_cuda.so"
ENV_VAR = "UNIGRPO_CUDA_LIB"
ABI_VERSION = 1                                  # must match kAbiVersion in kernels/cuda/flow.cu
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # DTypeCode in flow_thread.cuh
_PKG_DIR = Path(__file__).resolve().parent

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {   # name -> (restype, argtypes); pointers as void*, the stream last
    "unigrpo_cuda_abi_version": (_I32, []),
    "unigrpo_cuda_error_string": (ctypes.c_char_p, [_I32]),
    "unigrpo_cuda_probe": (_I32, []),
    "unigrpo_flow_num_chunks": (_I64, [_I64, _I64, _I32, _I32]),
    "unigrpo_sde_step_fwd": (_I32, [_P] * 10 + [_I64, _I64, _I64, _I32, _P]),
    "unigrpo_flow_sums_fwd": (_I32, [_P] * 6 + [_I64, _I64, _I64, _I32, _P]),
    "unigrpo_flow_sums_bwd": (_I32, [_P] * 6 + [_I64, _I64, _I64, _I32, _I32, _I32, _P]),
}

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "path": None, "error": None, "probe_error": None}
_device_ok: dict[int, str | None] = {}           # device index -> None (usable) or why not


# ------------------------------------------------------------------------------------------- loading

def library_candidates() -> list[Path]:
    """Where the library is looked for, in order (see the module docstring)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env)]
    paths = [_PKG_DIR / "cuda" / LIB_NAME]
    repo = _PKG_DIR.parent
    if (repo / "CMakeLists.txt").is_file():      # a source checkout (editable install or sys.path)
        paths.append(repo / "build" / "cuda" / "lib" / LIB_NAME)
    return paths


def _open_library() -> tuple[ctypes.CDLL | None, Path | None, str | None]:
    reasons = []
    for path in library_candidates():
        if not path.is_file():
            reasons.append(f"{path}: no such file")
            continue
        try:
            lib = ctypes.CDLL(str(path))
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            version = lib.unigrpo_cuda_abi_version()
        except (OSError, AttributeError) as err:
            reasons.append(f"{path}: {err}")
            continue
        if version != ABI_VERSION:
            reasons.append(f"{path}: ABI version {version}, this unigrpo_kernels needs {ABI_VERSION} (rebuild it)")
            continue
        return lib, path, None
    return None, None, "; ".join(reasons) or "no candidate paths"


def _library() -> ctypes.CDLL | None:
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _state["lib"], _state["path"], _state["error"] = _open_library()
    return _state["lib"]


def _device_index(device) -> int:
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise ValueError(f"device {dev} is not a CUDA device")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _probe(lib: ctypes.CDLL, index: int) -> str | None:
    with _lock:
        if index not in _device_ok:
            with torch.cuda.device(index):
                code = lib.unigrpo_cuda_probe()
            _device_ok[index] = None if code == 0 else (
                f"the library cannot run on cuda:{index} ({torch.cuda.get_device_name(index)}): "
                f"{lib.unigrpo_cuda_error_string(code).decode()} (cudaError {code})")
        return _device_ok[index]


def cuda_library_available(device=None) -> bool:
    """True when the CUDA library is loaded and can run on `device` (default: the current CUDA device).
    Never raises; the answer is cached (per device)."""
    try:
        if not torch.cuda.is_available():
            return False
        lib = _library()
        return lib is not None and _probe(lib, _device_index(device)) is None
    except Exception as err:  # noqa: BLE001 - a probe must not break backend selection
        with _lock:
            _state["probe_error"] = f"probe failed: {type(err).__name__}: {err}"
        return False


def cuda_library_status(device=None) -> str:
    """One line: which library is loaded, or why the CUDA backend is unavailable."""
    if not torch.cuda.is_available():
        return "unavailable: torch sees no CUDA device"
    lib = _library()
    if lib is None:
        return f"unavailable: {LIB_NAME} not loaded ({_state['error']})"
    try:
        why = _probe(lib, _device_index(device))
    except Exception as err:  # noqa: BLE001
        why = f"probe failed: {type(err).__name__}: {err}"
    return f"loaded {_state['path']} (ABI {ABI_VERSION})" + (f" but unavailable: {why}" if why else "")


def _require(device: torch.device) -> ctypes.CDLL:
    if not cuda_library_available(device):
        raise RuntimeError(f"the unigrpo CUDA backend is {cuda_library_status(device)}; build it with "
                           "`pip install -e .` (needs nvcc and cmake) or use backend='triton'/'torch'")
    return _state["lib"]


def _check_launch(lib: ctypes.CDLL, fn: str, code: int) -> None:
    if code != 0:
        raise RuntimeError(f"{fn} failed: {lib.unigrpo_cuda_error_string(code).decode()} (cudaError {code})")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _planned_chunks(B: int, D: int, code: int, sm_count: int) -> int:
    chunks = _state["lib"].unigrpo_flow_num_chunks(B, D, code, sm_count)
    if chunks < 1:
        raise RuntimeError(f"unigrpo_flow_num_chunks({B}, {D}, {code}, {sm_count}) = {chunks}")
    return chunks


# ---------------------------------------------------------------------------------------- validation

def _fmt_dtypes(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check(name: str, t, shape: tuple[int, ...], dtypes) -> None:
    """ValueError naming `name` unless t is a contiguous tensor of `shape` with a dtype in `dtypes`."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape):
        raise ValueError(f"{name} must be {len(shape)}-D {list(shape)}, got {t.dim()}-D {list(t.shape)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of "
                         f"{_fmt_dtypes(dtypes)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {list(t.stride())} for shape {list(t.shape)}")


def _check_2d(name: str, t) -> tuple[int, int]:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, D], got {t.dim()}-D {list(t.shape)}")
    return int(t.shape[0]), int(t.shape[1])


def _check_device(**tensors: Tensor) -> torch.device:
    """All tensors on one CUDA device; returns it."""
    items = list(tensors.items())
    first_name, first = items[0]
    if first.device.type != "cuda":
        raise ValueError(f"{first_name} is on {first.device}; the cuda backend needs CUDA tensors")
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one CUDA device")
    return first.device


def _chunk_count(chunks, B: int, D: int, code: int, device: torch.device) -> int:
    if chunks is None:
        return _planned_chunks(B, D, code, _sm_count(device.index))
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1 or B * chunks >= 2**31:
        raise ValueError(f"chunks={chunks!r} must be an int >= 1 with B*chunks < 2**31 (B={B})")
    return chunks


def _workspace(workspace, n: int, device: torch.device) -> Tensor:
    if workspace is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    if not (isinstance(workspace, Tensor) and workspace.dtype == torch.float32 and workspace.is_contiguous()
            and workspace.device == device and workspace.numel() >= n):
        raise ValueError(f"workspace must be a contiguous float32 tensor on {device} with >= {n} elements, got "
                         f"{workspace.dtype if isinstance(workspace, Tensor) else type(workspace).__name__}")
    return workspace


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ------------------------------------------------------------------------------------------ the ops

def sde_step_fwd(x_BD: Tensor, v_BD: Tensor, xi_BD: Tensor, a_B: Tensor, b_B: Tensor, std_B: Tensor,
                 want_mean: bool, *, chunks: int | None = None, out: tuple | None = None,
                 workspace: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """μ = a·x + b·v, x' = μ + s·ξ per row (§3). x_BD, xi_BD fp32 [B, D]; v_BD bf16/fp16/fp32 [B, D]; a_B, b_B,
    std_B fp32 [B]; all contiguous on one CUDA device. Returns (x_next_BD fp32, sqsum_B fp32 = Σ_d (x' − μ)² from
    the stored fp32 values, mean_BD fp32 if want_mean else None). For tests: `out` = (x_next, sqsum, mean or
    None) to write into, `chunks` and `workspace` (≥ B·chunks fp32) to force the reduction layout."""
    B, D = _check_2d("x_BD", x_BD)
    _check("x_BD", x_BD, (B, D), (torch.float32,))
    _check("v_BD", v_BD, (B, D), KERNEL_DTYPES)
    _check("xi_BD", xi_BD, (B, D), (torch.float32,))
    for name, t in (("a_B", a_B), ("b_B", b_B), ("std_B", std_B)):
        _check(name, t, (B,), (torch.float32,))
    if not isinstance(want_mean, bool):
        raise ValueError(f"want_mean must be a bool, got {want_mean!r}")
    dev = _check_device(x_BD=x_BD, v_BD=v_BD, xi_BD=xi_BD, a_B=a_B, b_B=b_B, std_B=std_B)
    if out is None:
        x_next = torch.empty_like(x_BD)
        sqsum = torch.empty(B, dtype=torch.float32, device=dev)
        mean = torch.empty_like(x_BD) if want_mean else None
    else:
        if not (isinstance(out, tuple) and len(out) == 3):
            raise ValueError("out must be a tuple (x_next_BD, sqsum_B, mean_BD or None)")
        x_next, sqsum, mean = out
        _check("out x_next_BD", x_next, (B, D), (torch.float32,))
        _check("out sqsum_B", sqsum, (B,), (torch.float32,))
        if want_mean:
            _check("out mean_BD", mean, (B, D), (torch.float32,))
        else:
            mean = None
        _check_device(x_BD=x_BD, x_next=x_next, sqsum=sqsum, **({"mean": mean} if want_mean else {}))
    if B == 0 or D == 0:
        sqsum.zero_()
        return x_next, sqsum, mean
    lib = _require(dev)
    code = _DTYPE_CODES[v_BD.dtype]
    n_chunks = _chunk_count(chunks, B, D, code, dev)
    ws = _workspace(workspace, B * n_chunks, dev)
    with torch.cuda.device(dev):
        err = lib.unigrpo_sde_step_fwd(x_BD.data_ptr(), v_BD.data_ptr(), xi_BD.data_ptr(), a_B.data_ptr(),
                                       b_B.data_ptr(), std_B.data_ptr(), x_next.data_ptr(), _ptr(mean),
                                       sqsum.data_ptr(), ws.data_ptr(), B, D, n_chunks, code, _stream(dev))
    _check_launch(lib, "unigrpo_sde_step_fwd", err)
    return x_next, sqsum, mean


def _check_flow_streams(v_BD, xi_BD, v_old_BD, v_ref_BD) -> tuple[int, int]:
    B, D = _check_2d("v_BD", v_BD)
    _check("v_BD", v_BD, (B, D), KERNEL_DTYPES)
    _check("xi_BD", xi_BD, (B, D), (torch.float32,))
    _check("v_old_BD", v_old_BD, (B, D), (v_BD.dtype,))
    _check("v_ref_BD", v_ref_BD, (B, D), (v_BD.dtype,))
    return B, D


def flow_sums_fwd(v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, v_ref_BD: Tensor, *, chunks: int | None = None,
                  out: Tensor | None = None, workspace: Tensor | None = None) -> Tensor:
    """Row sums of the flow loss (reference `flow_row_sums`): [B, 3] fp32 with Σ_d ξ·(v − v_old),
    Σ_d (v − v_old)², Σ_d (v − v_ref)²; fp32 accumulation, one read of each stream. v_BD, v_old_BD, v_ref_BD one
    dtype (bf16/fp16/fp32), xi_BD fp32, all [B, D] contiguous on one CUDA device. For tests: `out` [B, 3],
    `chunks`, `workspace` (≥ B·chunks·3 fp32)."""
    B, D = _check_flow_streams(v_BD, xi_BD, v_old_BD, v_ref_BD)
    dev = _check_device(v_BD=v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD, v_ref_BD=v_ref_BD)
    if out is None:
        out = torch.empty(B, 3, dtype=torch.float32, device=dev)
    else:
        _check("out", out, (B, 3), (torch.float32,))
        _check_device(v_BD=v_BD, out=out)
    if B == 0 or D == 0:
        return out.zero_()
    lib = _require(dev)
    code = _DTYPE_CODES[v_BD.dtype]
    n_chunks = _chunk_count(chunks, B, D, code, dev)
    ws = _workspace(workspace, B * n_chunks * 3, dev)
    with torch.cuda.device(dev):
        err = lib.unigrpo_flow_sums_fwd(v_BD.data_ptr(), xi_BD.data_ptr(), v_old_BD.data_ptr(), v_ref_BD.data_ptr(),
                                        out.data_ptr(), ws.data_ptr(), B, D, n_chunks, code, _stream(dev))
    _check_launch(lib, "unigrpo_flow_sums_fwd", err)
    return out


def flow_sums_bwd(g_B3: Tensor, v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, v_ref_BD: Tensor, use_old: bool,
                  use_ref: bool, *, chunks: int | None = None, out: Tensor | None = None) -> Tensor:
    """dL/dv = g0·ξ + 2·g1·(v − v_old)·[use_old] + 2·g2·(v − v_ref)·[use_ref], one pass in fp32, one rounding to
    v's dtype at the store; a stream whose flag is off is not read. g_B3 fp32 [B, 3] (the upstream gradient of
    the sums); the [B, D] streams as in `flow_sums_fwd`. Returns dv_BD in v's dtype. For tests: `out`, `chunks`."""
    B, D = _check_flow_streams(v_BD, xi_BD, v_old_BD, v_ref_BD)
    _check("g_B3", g_B3, (B, 3), (torch.float32,))
    for name, flag in (("use_old", use_old), ("use_ref", use_ref)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    dev = _check_device(v_BD=v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD, v_ref_BD=v_ref_BD, g_B3=g_B3)
    if out is None:
        out = torch.empty_like(v_BD)
    else:
        _check("out", out, (B, D), (v_BD.dtype,))
        _check_device(v_BD=v_BD, out=out)
    if B == 0 or D == 0:
        return out
    lib = _require(dev)
    code = _DTYPE_CODES[v_BD.dtype]
    n_chunks = _chunk_count(chunks, B, D, code, dev)
    with torch.cuda.device(dev):
        err = lib.unigrpo_flow_sums_bwd(g_B3.data_ptr(), v_BD.data_ptr(), xi_BD.data_ptr(), v_old_BD.data_ptr(),
                                        v_ref_BD.data_ptr(), out.data_ptr(), B, D, n_chunks, code, int(use_old),
                                        int(use_ref), _stream(dev))
    _check_launch(lib, "unigrpo_flow_sums_bwd", err)
    return out
