"""The reward interface and its checks.

A reward is any callable `fn(images, prompts, metadata) -> scores`:
- images: float32 [B, 3, H, W] in [-1, 1] (CPU);
- prompts: B prompt texts; metadata: B dicts (each record's metadata, unchanged from the prompt file);
- scores: B finite floats (a tensor, array or list).
`score()` calls one, checks what comes back and turns every failure into a `RewardError` that names the reward,
where it runs (the url of a remote one) and the sample. A reward that raises is re-run sample by sample so the
error can name the sample that failed.

A reward may abstain on single samples by returning NaN there only if it says so (`may_abstain = True`, the
VLM judge on an answer it cannot parse); everywhere else NaN is an error.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

__all__ = ["RewardFn", "RewardError", "score"]


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]):
        """images float32 [B, 3, H, W] in [-1, 1]; returns B scores."""


class RewardError(RuntimeError):
    """A reward failed, timed out for good, or answered something unusable; the message names the reward,
    its url (remote ones) and the sample."""


def _where(label: str, fn) -> str:
    url = getattr(fn, "url", None)
    return f"reward {label!r}" + (f" at {url}" if url else "")


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def score(fn: RewardFn, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None,
          label: str = "reward") -> torch.Tensor:
    """Call `fn` on the batch and check it: float32 [B] of finite scores (NaN allowed where `fn.may_abstain`)."""
    B = images.shape[0]
    if len(prompts) != B:
        raise ValueError(f"{B} images but {len(prompts)} prompts")
    metadata = list(metadata) if metadata is not None else [{} for _ in range(B)]
    where = _where(label, fn)
    try:
        raw = fn(images, prompts, metadata)
    except RewardError:
        raise
    except Exception as err:
        if B > 1:
            for i in range(B):
                try:
                    fn(images[i:i + 1], prompts[i:i + 1], metadata[i:i + 1])
                except Exception as one:
                    raise RewardError(f"{where} failed on sample {i} (prompt {_short(prompts[i])}): "
                                      f"{type(one).__name__}: {one}") from one
        raise RewardError(f"{where} failed on the batch of {B}: {type(err).__name__}: {err}") from err
    try:
        out = torch.as_tensor(raw, dtype=torch.float32).reshape(-1)
    except Exception as err:
        raise RewardError(f"{where} returned {type(raw).__name__}, not {B} numbers: {err}") from err
    if out.shape[0] != B:
        raise RewardError(f"{where} returned {out.shape[0]} scores for {B} samples")
    bad = torch.isinf(out) if getattr(fn, "may_abstain", False) else ~torch.isfinite(out)
    if bad.any():
        i = int(torch.nonzero(bad).flatten()[0])
        raise RewardError(f"{where} returned {out[i].item()} for sample {i} (prompt {_short(prompts[i])})")
    return out
