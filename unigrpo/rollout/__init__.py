"""Rollouts: reasoning sampling with a KV cache, then denoising that attends to the cached context."""
from unigrpo.rollout.generate import Reasoning, denoise, generate_reasoning, sample

__all__ = ["Reasoning", "denoise", "generate_reasoning", "sample"]
