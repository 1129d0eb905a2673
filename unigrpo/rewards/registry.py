"""The reward registry: `rewards:` in the configs is a list of `RewardSpec`s; their weighted sum is the training
reward, and each is logged on its own as `reward/<label>`.

Registered rewards (`name`) and the fields each takes besides name / weight / label:
    shapes_ta, shapes_geneval, shapes_exact   the shapes-world verifier (rewards/verifier.py)        —
    clip          CLIP similarity from a local directory (rewards/clip.py)             path, device, batch_size, logit_scale
    python        your own RewardFn, "module:function" (called with **options)         function, options
    remote        a reward server over HTTP (rewards/remote.py)                        url, batch_size, timeout, retries,
                                                                                        backoff, concurrency
    vlm_judge     an OpenAI-compatible chat-completions VLM (rewards/vlm_judge.py)     url, model, template, pattern,
                                                                                        score_range, max_tokens, timeout,
                                                                                        retries, backoff, concurrency
A field another reward takes, set on this one, is an error (it would be silently ignored otherwise).
A list item may be just a name: `rewards: [shapes_ta]`.

`RewardSet` scores a batch with every reward: remote and VLM rewards run in threads, concurrently with each
other and with the local rewards on the calling thread, so the slowest service sets the reward time, not
their sum. A sample a reward abstains on (NaN from a `may_abstain` reward) gets the mean of that reward over
its group's other samples, so it carries no advantage; the count is logged as `reward/<label>/abstained`.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import torch

from unigrpo.rewards.base import RewardError, score
from unigrpo.rewards.verifier import SHAPES_REWARDS, ShapesVerifierReward
from unigrpo.rewards.vlm_judge import DEFAULT_PATTERN, DEFAULT_TEMPLATE

__all__ = ["RewardSpec", "RewardSet", "build_reward", "reward_names", "normalise_rewards"]

_REMOTE_FIELDS = ("url", "timeout", "retries", "backoff", "concurrency")
FIELDS = {
    **{name: () for name in SHAPES_REWARDS},
    "clip": ("path", "device", "batch_size", "logit_scale"),
    "python": ("function", "options"),
    "remote": _REMOTE_FIELDS + ("batch_size",),
    "vlm_judge": _REMOTE_FIELDS + ("model", "template", "pattern", "score_range", "max_tokens"),
}
REQUIRED = {"clip": ("path",), "python": ("function",), "remote": ("url",), "vlm_judge": ("url",)}
_COMMON = ("name", "weight", "label")
RESERVED_LABELS = ("mean", "std", "groups_with_signal")


def reward_names() -> tuple[str, ...]:
    return tuple(FIELDS)


@dataclass
class RewardSpec:
    name: str
    """the registered reward: shapes_ta, shapes_geneval, shapes_exact, clip, python, remote, vlm_judge"""
    weight: float = 1.0
    """its weight in the training reward (0: logged, not trained on)"""
    label: str = ""
    """its name in logs and tables (default: name); must be unique"""
    path: str = ""
    """clip: a local directory with a CLIP model + processor"""
    device: str = "cpu"
    """clip: the device the model runs on"""
    logit_scale: bool = False
    """clip: multiply the cosine by the model's logit scale (PickScore's convention)"""
    function: str = ""
    """python: "module:function" with the RewardFn signature (images, prompts, metadata) -> [B] scores"""
    options: dict = field(default_factory=dict)
    """python: keyword arguments passed to the function"""
    url: str = ""
    """remote: the reward server's POST url; vlm_judge: the OpenAI-compatible base url (…/v1)"""
    batch_size: int = 32
    """clip: images per forward; remote: images per request"""
    timeout: float = 60.0
    """remote, vlm_judge: seconds per request"""
    retries: int = 3
    """remote, vlm_judge: retries of a failed request (then the run stops with an error)"""
    backoff: float = 1.0
    """remote, vlm_judge: seconds before the first retry, doubled each time"""
    concurrency: int = 4
    """remote, vlm_judge: requests in flight at once"""
    model: str = ""
    """vlm_judge: the model name the endpoint serves"""
    template: str = DEFAULT_TEMPLATE
    """vlm_judge: the user message; {prompt} is replaced by the caption"""
    pattern: str = DEFAULT_PATTERN
    """vlm_judge: regular expression whose first group is the score"""
    score_range: tuple[float, float] = (0.0, 10.0)
    """vlm_judge: [lo, hi] of the raw score, mapped to [0, 1]"""
    max_tokens: int = 64
    """vlm_judge: the answer's token budget"""

    def __post_init__(self):
        if self.name not in FIELDS:
            raise ValueError(f"reward name {self.name!r} is not registered; expected one of {list(FIELDS)}")
        if not self.label:
            self.label = self.name
        if self.label in RESERVED_LABELS or "/" in self.label:
            raise ValueError(f"reward label {self.label!r} is reserved or has a '/'; the trainer logs "
                             f"reward/{{{', '.join(RESERVED_LABELS)}}} itself: choose another label")
        if not math.isfinite(self.weight):
            raise ValueError(f"reward {self.label!r}: weight must be a finite number, got {self.weight}")
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(self) if f.name not in _COMMON}
        own = FIELDS[self.name]
        for key, default in defaults.items():
            if key not in own and getattr(self, key) != default:
                takers = [n for n, fs in FIELDS.items() if key in fs]
                raise ValueError(f"reward {self.label!r} ({self.name}) does not take {key!r} (set to "
                                 f"{getattr(self, key)!r}); {key} is for {', '.join(takers)}; {self.name} takes "
                                 f"{', '.join(own) or 'no options'}")
        for key in REQUIRED.get(self.name, ()):
            if not getattr(self, key):
                raise ValueError(f"reward {self.label!r} ({self.name}) needs {key}")
        if self.name == "python" and ":" not in self.function:
            raise ValueError(f"reward {self.label!r}: function must be 'module:function', got {self.function!r}")
        for key in ("batch_size", "concurrency", "max_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"reward {self.label!r}: {key} must be >= 1, got {getattr(self, key)}")
        if self.retries < 0 or not self.timeout > 0 or self.backoff < 0:
            raise ValueError(f"reward {self.label!r}: need retries >= 0, timeout > 0, backoff >= 0; got "
                             f"{self.retries}, {self.timeout}, {self.backoff}")


def normalise_rewards(items: Sequence) -> list[RewardSpec]:
    """RewardSpecs from a config list whose items are specs or bare names; labels must be unique."""
    specs = [RewardSpec(x) if isinstance(x, str) else x for x in items]
    if not specs:
        raise ValueError("rewards is empty; give at least one, e.g. rewards: [{name: shapes_ta}]")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"reward labels must be unique, {dup} repeats; give each a label: ...")
    if all(s.weight == 0 for s in specs):
        raise ValueError("every reward has weight 0: nothing to train on")
    return specs


def _import_function(spec: str):
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"python reward: cannot import {spec!r}: {err}") from None
    if not callable(fn):
        raise ValueError(f"python reward: {spec!r} is not callable")
    return fn


class _WithOptions:
    def __init__(self, fn, options: dict):
        self.fn, self.options = fn, options
        self.may_abstain = getattr(fn, "may_abstain", False)

    def __call__(self, images, prompts, metadata):
        return self.fn(images, prompts, metadata, **self.options)


def build_reward(spec: RewardSpec):
    """The RewardFn of one spec."""
    n = spec.name
    if n in SHAPES_REWARDS:
        return ShapesVerifierReward(SHAPES_REWARDS[n])
    if n == "clip":
        from unigrpo.rewards.clip import ClipReward   # imports transformers' CLIP only when asked for

        return ClipReward(spec.path, device=spec.device, batch_size=spec.batch_size, logit_scale=spec.logit_scale)
    if n == "python":
        fn = _import_function(spec.function)
        return _WithOptions(fn, dict(spec.options)) if spec.options else fn
    if n == "remote":
        from unigrpo.rewards.remote import RemoteReward

        return RemoteReward(spec.url, batch_size=spec.batch_size, timeout=spec.timeout, retries=spec.retries,
                            backoff=spec.backoff, concurrency=spec.concurrency, label=spec.label)
    from unigrpo.rewards.vlm_judge import VlmJudgeReward

    return VlmJudgeReward(spec.url, model=spec.model, template=spec.template, pattern=spec.pattern,
                          score_range=tuple(spec.score_range), max_tokens=spec.max_tokens, timeout=spec.timeout,
                          retries=spec.retries, backoff=spec.backoff, concurrency=spec.concurrency, label=spec.label)


def _fill_abstained(s: torch.Tensor, group_size: int) -> torch.Tensor:
    """NaN → the mean of the other samples of its group (0 when the whole group abstained)."""
    g = s.view(-1, group_size)
    ok = ~torch.isnan(g)
    mean = torch.where(ok, g, torch.zeros_like(g)).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
    return torch.where(ok, g, mean.expand_as(g)).reshape(-1)


class RewardSet:
    """Every configured reward; `__call__` gives the weighted total and each reward's scores."""

    def __init__(self, specs: Sequence):
        self.specs = normalise_rewards(specs)
        self.fns = [build_reward(s) for s in self.specs]
        self.labels = [s.label for s in self.specs]

    def check_records(self, records) -> None:
        """Let each reward refuse prompts it cannot score (the shapes verifier: non-shapes metadata) up front."""
        for fn in self.fns:
            if hasattr(fn, "check_records"):
                fn.check_records(records)

    def _is_remote(self, fn) -> bool:
        return getattr(fn, "url", None) is not None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict],
                 group_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """images float [B, 3, H, W] in [-1, 1] → (total float32 [B], {label: float32 [B]}, extra metrics).
        group_size: consecutive rows that share a prompt (abstentions take their group's mean)."""
        images = images.float().cpu()
        prompts, metadata = list(prompts), list(metadata)
        results: dict[str, torch.Tensor] = {}
        remote = [(s, f) for s, f in zip(self.specs, self.fns) if self._is_remote(f)]
        local = [(s, f) for s, f in zip(self.specs, self.fns) if not self._is_remote(f)]
        pool = ThreadPoolExecutor(len(remote)) if remote else None
        try:
            futures = {s.label: pool.submit(score, f, images, prompts, metadata, s.label) for s, f in remote}
            for s, f in local:
                results[s.label] = score(f, images, prompts, metadata, label=s.label)
            for label, fut in futures.items():
                results[label] = fut.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        extra = {}
        for s, f in zip(self.specs, self.fns):
            if getattr(f, "may_abstain", False):
                r = results[s.label]
                extra[f"reward/{s.label}/abstained"] = float(torch.isnan(r).sum())
                results[s.label] = _fill_abstained(r, group_size) if r.numel() % group_size == 0 else r
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        for s in self.specs:
            total = total + s.weight * results[s.label]
        if not torch.isfinite(total).all():
            raise RewardError(f"the weighted reward is not finite for samples "
                              f"{torch.nonzero(~torch.isfinite(total)).flatten().tolist()}")
        return total, {s.label: results[s.label] for s in self.specs}, extra
