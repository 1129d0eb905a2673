"""Test-wide settings: with no GPU, Triton kernels run in the interpreter (set before any @triton.jit runs);
hypothesis without per-example deadlines (CPU timings vary with load)."""
import os

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("unigrpo", deadline=None, print_blob=True)
settings.load_profile("unigrpo")
