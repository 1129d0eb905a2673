"""Rewards that run as separate services: the reward-server protocol, its HTTP client, and image encoding.

The protocol (one POST, JSON both ways, never pickle):
    request  {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [object, ...]}
    answer   {"scores": [float, ...]}   one per image, in order
`unigrpo serve-reward` (rewards/server.py) serves any registered reward this way.

The client sends the batch in requests of `batch_size` images, up to `concurrency` of them at once (threads;
requests' sessions are per thread). A request that fails — a connection error, a timeout (`timeout` seconds per
request), an HTTP error status, a body that is not JSON, not {"scores": [...]}, the wrong number of scores, or a
score that is not a finite number — is retried `retries` times with exponential backoff (`backoff`·2^k s), then
raises RewardError naming the reward, the url and the samples of that request.
"""
from __future__ import annotations

import base64
import io
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import requests
import torch
from PIL import Image

from unigrpo.rewards.base import RewardError
from unigrpo.world.render import to_uint8

__all__ = ["RemoteReward", "RetryingPost", "RetriesExhausted", "encode_png", "decode_png", "images_to_png", "pngs_to_images", "parse_scores"]


def encode_png(image_HW3: np.ndarray) -> str:
    """uint8 [H, W, 3] → base64 PNG text."""
    buf = io.BytesIO()
    Image.fromarray(image_HW3, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """base64 PNG (or any image PIL reads) → uint8 [H, W, 3]; ValueError when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as err:
        raise ValueError(f"not a base64-encoded image ({type(err).__name__}: {err})") from None


def images_to_png(images_B3HW: torch.Tensor) -> list[str]:
    """float [B, 3, H, W] in [-1, 1] → B base64 PNGs (rounded to uint8 as the verifier sees them)."""
    return [encode_png(x) for x in to_uint8(images_B3HW.float().cpu())]


def pngs_to_images(pngs: Sequence[str]) -> torch.Tensor:
    """B base64 PNGs of one size → float32 [B, 3, H, W] in [-1, 1] (the inverse of images_to_png)."""
    arr = np.stack([decode_png(p) for p in pngs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def parse_scores(body: object, n: int) -> list[float]:
    """The scores of an answer {"scores": [n finite numbers]}; ValueError saying what is wrong."""
    if not isinstance(body, dict) or "scores" not in body:
        raise ValueError(f"expected a JSON object {{\"scores\": [...]}}, got {str(body)[:200]}")
    scores = body["scores"]
    if not isinstance(scores, list):
        raise ValueError(f"'scores' must be a list, got {type(scores).__name__}")
    if len(scores) != n:
        raise ValueError(f"answered {len(scores)} scores for {n} images")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"score {i} is {s!r}, not a finite number")
    return [float(s) for s in scores]


class RetriesExhausted(Exception):
    """Every attempt of a RetryingPost failed; `last` says how the last one did."""

    def __init__(self, attempts: int, last: str):
        super().__init__(last)
        self.attempts, self.last = attempts, last


class RetryingPost:
    """POST a JSON body to `url` until `read(answer)` accepts the decoded answer: 1 + `retries` attempts, the k-th
    retry after backoff·2^(k−1) s, `timeout` s each; requests' sessions are per thread. Any transport error, HTTP
    status other than 200, non-JSON body, or exception from `read` (ValueError, KeyError, IndexError, TypeError)
    is a failed attempt; after the last one, RetriesExhausted."""

    def __init__(self, url: str, *, timeout: float, retries: int, backoff: float):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self._local = threading.local()
        self.sent = 0

    def post(self, body: dict, read):
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.sent += 1
            try:
                r = self._local.session.post(self.url, json=body, timeout=self.timeout)
                if r.status_code != 200:
                    raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
                try:
                    answer = r.json()
                except ValueError:
                    raise ValueError(f"the answer is not JSON: {r.text[:200]!r}") from None
                return read(answer)
            except requests.Timeout:
                last = f"no answer within the timeout of {self.timeout} s"
            except requests.RequestException as err:
                last = f"{type(err).__name__}: {err}"
            except ValueError as err:
                last = str(err)
            except (KeyError, IndexError, TypeError) as err:
                last = f"unexpected answer ({type(err).__name__}: {err})"
        raise RetriesExhausted(self.retries + 1, last)


class RemoteReward:
    """HTTP client of a reward server (module docstring). float32 [B]."""

    def __init__(self, url: str, *, batch_size: int = 32, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, concurrency: int = 4, label: str = "remote"):
        self.url, self.batch_size, self.timeout = url, batch_size, timeout
        self.retries, self.backoff, self.concurrency, self.label = retries, backoff, concurrency, label
        self.http = RetryingPost(url, timeout=timeout, retries=retries, backoff=backoff)

    @property
    def requests_sent(self) -> int:
        return self.http.sent

    def _post(self, start: int, pngs: list[str], prompts: list[str], metadata: list[dict]) -> list[float]:
        body = {"images": pngs, "prompts": prompts, "metadata": metadata}
        try:
            return self.http.post(body, lambda answer: parse_scores(answer, len(pngs)))
        except RetriesExhausted as err:
            raise RewardError(f"reward {self.label!r} at {self.url}: samples {start}..{start + len(pngs) - 1} (first "
                              f"prompt {prompts[0][:60]!r}) failed after {err.attempts} attempts: {err.last}") from None

    def __call__(self, images, prompts, metadata):
        pngs = images_to_png(images)
        prompts, metadata = list(prompts), [dict(m) for m in metadata]
        starts = list(range(0, len(pngs), self.batch_size))
        jobs = [(s, pngs[s:s + self.batch_size], prompts[s:s + self.batch_size], metadata[s:s + self.batch_size])
                for s in starts]
        if len(jobs) == 1 or self.concurrency == 1:
            parts = [self._post(*j) for j in jobs]
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(jobs))) as pool:
                parts = list(pool.map(lambda j: self._post(*j), jobs))
        return torch.tensor([s for p in parts for s in p], dtype=torch.float32)
