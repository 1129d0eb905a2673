"""A VLM judge as a reward, through an OpenAI-compatible chat-completions endpoint (vLLM and SGLang serve these).

One request per image: a user message with the image as a base64 PNG data URL and the text `template` with
`{prompt}` replaced by the caption; temperature 0. The answer's text is searched with the regular expression
`pattern`; its first group is the raw score, mapped from `score_range` [lo, hi] to [0, 1] (clamped).

An answer that does not match is counted, logged with its text, and scored NaN: the reward abstains on that
sample (`may_abstain`), and the reward set gives it its group's mean, so it carries no advantage. It is never
scored 0. Transport failures (connection, timeout, HTTP status, a body without choices[0].message.content) are
retried `retries` times with backoff, then raise RewardError naming the url and the sample.
"""
from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from unigrpo.rewards.base import RewardError
from unigrpo.rewards.remote import RetriesExhausted, RetryingPost, images_to_png

__all__ = ["VlmJudgeReward", "DEFAULT_TEMPLATE", "DEFAULT_PATTERN"]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = ("You judge how well an image matches its caption.\nCaption: {prompt}\n"
                    "Rate the match from 0 (unrelated) to 10 (exact). Reply with one line: Score: <number>")
DEFAULT_PATTERN = r"[Ss]core\s*[:=]\s*(-?\d+(?:\.\d+)?)"


def _content(answer) -> str:
    """choices[0].message.content of a chat-completions answer (KeyError / TypeError when absent)."""
    text = answer["choices"][0]["message"]["content"]
    if not isinstance(text, str):
        raise ValueError(f"choices[0].message.content is {type(text).__name__}, not text")
    return text


class VlmJudgeReward:
    """Chat-completions VLM judge (module docstring). float32 [B], NaN where the answer did not parse."""

    may_abstain = True

    def __init__(self, url: str, *, model: str = "", template: str = DEFAULT_TEMPLATE,
                 pattern: str = DEFAULT_PATTERN, score_range: tuple[float, float] = (0.0, 10.0),
                 max_tokens: int = 64, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 concurrency: int = 8, label: str = "vlm_judge"):
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        if "{prompt}" not in template:
            raise ValueError(f"vlm_judge: template must contain {{prompt}} (the caption), got {template!r}")
        try:
            self.pattern = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"vlm_judge: pattern {pattern!r} is not a regular expression: {err}") from None
        if self.pattern.groups < 1:
            raise ValueError(f"vlm_judge: pattern {pattern!r} needs one group that captures the score")
        lo, hi = score_range
        if not hi > lo:
            raise ValueError(f"vlm_judge: score_range must be [lo, hi] with hi > lo, got {list(score_range)}")
        self.model, self.template, self.lo, self.hi = model, template, float(lo), float(hi)
        self.max_tokens, self.timeout, self.retries, self.backoff = max_tokens, timeout, retries, backoff
        self.concurrency, self.label = concurrency, label
        self.unparsed = 0
        self.http = RetryingPost(self.url, timeout=timeout, retries=retries, backoff=backoff)
        self._lock = threading.Lock()

    def parse(self, answer: str) -> float:
        """The scaled score in [0, 1] of one answer text, or NaN when the pattern does not match."""
        m = self.pattern.search(answer)
        if m is None:
            return float("nan")
        try:
            raw = float(m.group(1))
        except ValueError:
            return float("nan")
        return min(1.0, max(0.0, (raw - self.lo) / (self.hi - self.lo)))

    def _ask(self, i: int, png: str, prompt: str) -> float:
        body = {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "text", "text": self.template.replace("{prompt}", prompt)}]}],
                "temperature": 0.0, "max_tokens": self.max_tokens}
        if self.model:
            body["model"] = self.model
        try:
            answer = self.http.post(body, _content)
        except RetriesExhausted as err:
            raise RewardError(f"reward {self.label!r} at {self.url}: sample {i} (prompt {prompt[:60]!r}) failed "
                              f"after {err.attempts} attempts: {err.last}") from None
        s = self.parse(answer)
        if s != s:
            with self._lock:
                self.unparsed += 1
            log.warning("reward %r: sample %d: the answer does not match %r, abstaining: %r", self.label, i,
                        self.pattern.pattern, answer[:200])
        return s

    def __call__(self, images, prompts, metadata):
        pngs = images_to_png(images)
        with ThreadPoolExecutor(max(1, min(self.concurrency, len(pngs)))) as pool:
            scores = list(pool.map(lambda a: self._ask(*a), zip(range(len(pngs)), pngs, prompts)))
        return torch.tensor(scores, dtype=torch.float32)
