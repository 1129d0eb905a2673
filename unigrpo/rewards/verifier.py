"""Rewards: the interface (images, prompts, metadata → one score per sample, batched) and the default, the
shapes-world verifier (it reads only the image).

A reward function that raises is re-run sample by sample so the error names the sample that failed.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from unigrpo.world import Prompt, verify
from unigrpo.world.verify import ta_exact_scores

REWARD_KINDS = ("ta", "geneval", "ta_exact")


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt], metadata: Sequence[dict]) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1]; returns float32 [B]."""


class ShapesVerifierReward:
    """The verifier's TA-style fraction of checks passed ("ta": partial credit, a denser signal), its
    GenEval-style all-correct score ("geneval"), or the TA-style fraction with one more check, exactly the
    asked-for number of objects ("ta_exact": stops paying for extra objects, which "ta" and "geneval" do)."""

    def __init__(self, kind: str = "ta"):
        if kind not in REWARD_KINDS:
            raise ValueError(f"reward kind {kind!r} unknown; expected one of {REWARD_KINDS}")
        self.kind = kind

    def __call__(self, images, prompts, metadata=()):
        res = verify(images.float().cpu(), list(prompts))
        if self.kind == "ta_exact":
            return ta_exact_scores(list(prompts), res.checks, res.objects)
        return (res.ta if self.kind == "ta" else res.geneval).float()


def score(reward_fn: RewardFn, images: torch.Tensor, prompts: Sequence[Prompt],
          metadata: Sequence[dict] | None = None) -> torch.Tensor:
    """Call the reward on the batch; check it returns B finite scores; on failure name the sample."""
    B = images.shape[0]
    metadata = list(metadata) if metadata is not None else [{} for _ in range(B)]
    try:
        out = torch.as_tensor(reward_fn(images, prompts, metadata), dtype=torch.float32).reshape(-1)
    except Exception as err:
        for i in range(B):
            try:
                reward_fn(images[i:i + 1], prompts[i:i + 1], metadata[i:i + 1])
            except Exception as one:
                raise RuntimeError(f"reward failed on sample {i} (prompt {prompts[i].text!r}): "
                                   f"{type(one).__name__}: {one}") from one
        raise RuntimeError(f"reward failed on the batch of {B} but on no single sample: {err}") from err
    if out.shape[0] != B:
        raise RuntimeError(f"reward returned {out.shape[0]} scores for {B} samples")
    bad = torch.nonzero(~torch.isfinite(out)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise RuntimeError(f"reward returned {out[i].item()} for sample {i} (prompt {prompts[i].text!r})")
    return out
