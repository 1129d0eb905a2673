"""The floating dtypes by their short names (configs, benchmark rows) and the ones the fused kernels read."""
from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "KERNEL_DTYPES", "dtype_name"]

DTYPE_NAMES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNEL_DTYPES: tuple[torch.dtype, ...] = tuple(DTYPE_NAMES.values())
"""the dtypes the fused kernels read their large streams (velocities, hidden states, weights) in"""


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype ("fp32", "bf16", "fp16"); str(dtype) for any other."""
    return next((k for k, v in DTYPE_NAMES.items() if v == dtype), str(dtype))
