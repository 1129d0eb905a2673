"""What a run records about where it ran: package versions (`_version`), the checkout's commit (`git_commit`,
"+dirty" when the tree has changes), the CPU model, `environment` (Python, platform, torch, triton, CUDA,
GPU properties), `gpu_telemetry` (clocks, power, temperature and throttle reasons from pynvml, guarded) and
`device_slug`, the device's name as used in result file names. REPO_ROOT is the folder that holds bench/.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Any

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_commit() -> str:
    """HEAD of the checkout bench/ lives in, with "+dirty" when the tree has changes; "unknown" without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions, device and commit of this run (pynvml telemetry is separate: gpu_telemetry)."""
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "triton": _version("triton"), "cuda": torch.version.cuda, "cpu": _cpu_model(),
           "cpu_threads": torch.get_num_threads(), "commit": git_commit(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = torch.cuda.get_device_name(device)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_gib": round(p.total_memory / 2**30, 2),
                      "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 2) or None}
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device"] = f"CPU ({env['cpu']})"
    return env


def gpu_telemetry(device: torch.device) -> dict:
    """Clocks, power, temperature and throttle reasons from pynvml. Guarded at every call: pynvml may be
    missing, and it fails on machines without an NVIDIA driver."""
    if device.type != "cuda":
        return {"available": False, "reason": "not a CUDA device"}
    try:
        import pynvml
    except Exception as err:
        return {"available": False, "reason": f"pynvml not importable ({err}); pip install nvidia-ml-py"}
    try:
        pynvml.nvmlInit()
    except Exception as err:
        return {"available": False, "reason": f"nvmlInit failed: {err}"}
    out: dict[str, Any] = {"available": True}
    try:
        handle = None
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)

        def get(key, f, *args, scale=1.0):
            try:
                v = f(handle, *args)
                out[key] = v * scale if isinstance(v, (int, float)) and scale != 1.0 else v
            except Exception as err:
                out[key] = f"n/a ({type(err).__name__})"

        get("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        get("mem_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM)
        get("sm_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM)
        get("mem_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_MEM)
        get("power_w", pynvml.nvmlDeviceGetPowerUsage, scale=1e-3)
        get("power_limit_w", pynvml.nvmlDeviceGetEnforcedPowerLimit, scale=1e-3)
        get("temperature_c", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        reasons_fn = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                      or getattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
        if reasons_fn is not None:
            try:
                mask = int(reasons_fn(handle))
                out["throttle_mask"] = mask
                names = set()
                for attr in dir(pynvml):
                    m = re.match(r"nvmlClocks(?:Throttle|Event)Reason(\w+)$", attr)
                    val = getattr(pynvml, attr)
                    if m and isinstance(val, int) and m.group(1) not in ("All", "None", "Unknown") \
                            and val and (mask & val) == val:
                        names.add(m.group(1))
                out["throttle_reasons"] = sorted(names)
            except Exception as err:
                out["throttle_reasons"] = f"n/a ({type(err).__name__})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def device_slug(env: dict, device: torch.device) -> str:
    """"nvidia-h100-80gb-hbm3" / "cpu-intel-xeon-platinum-8481c": lower-case letters, digits and dashes."""
    if device.type == "cuda":
        name = env["device"].lower()
    else:
        model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", env.get("cpu", "").lower())
        name = "cpu " + model
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:60] or device.type
