"""A control reward for experiments: uniform noise in [0, 1), independent of the image and the prompt
(seeded once per process). Training on it shows what the update does with no signal at all.

    PYTHONPATH=examples/rewards unigrpo train --config tiny base=unigrpo/assets/tiny_base \
        'rewards=[{name: python, function: "control:random_reward", label: random}]'
"""
import numpy as np
import torch

_rng = np.random.default_rng(12345)


def random_reward(images, prompts, metadata):
    """float32 [B] uniform in [0, 1)."""
    return torch.tensor(_rng.random(len(prompts)), dtype=torch.float32)
