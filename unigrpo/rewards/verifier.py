"""The shapes world's verifier as rewards (it reads only the image and the prompt's GenEval metadata).

- `shapes_ta`: the TA-style fraction of checks passed (partial credit, a denser signal);
- `shapes_geneval`: the GenEval-style all-correct score;
- `shapes_exact`: the TA-style fraction with one more check, exactly the asked-for number of objects
  (stops paying for extra objects, which the other two do);
- `shapes_clean`: partial credit that pays only for what was asked: the TA-style fraction × 1/(1 + |objects
  seen − asked|) × (1 − stray light), world/verify.py `clean_scores`.
The prompt spec comes from each sample's metadata (unigrpo/world/geneval.py), so any prompt file whose GenEval
metadata names only this world's shapes and colours is scored, however its text is phrased.
"""
from __future__ import annotations

from typing import Sequence

from unigrpo.world import verify
from unigrpo.world.geneval import from_geneval
from unigrpo.world.prompts import Prompt
from unigrpo.world.verify import clean_scores, stray_light, ta_exact_scores

__all__ = ["SHAPES_REWARDS", "ShapesVerifierReward", "records_to_prompts", "shapes_prompts"]

SHAPES_REWARDS = {"shapes_ta": "ta", "shapes_geneval": "geneval", "shapes_exact": "ta_exact",
                  "shapes_clean": "clean"}


def shapes_prompts(prompts: Sequence[str], metadata: Sequence[dict], where: Sequence[str] | None = None) -> list[Prompt]:
    """The world's Prompt of each (text, GenEval metadata); ValueError naming the sample (or its file line)."""
    out = []
    for i, (text, meta) in enumerate(zip(prompts, metadata)):
        try:
            out.append(from_geneval(text, meta))
        except ValueError as err:
            at = where[i] if where else f"sample {i}"
            raise ValueError(f"{at}: the shapes verifier cannot score {text!r}: {err}") from None
    return out


def records_to_prompts(records) -> list[Prompt]:
    """The world's Prompt of each PromptRecord; ValueError naming the first record's file line that is not about
    the shapes world."""
    return shapes_prompts([r.text for r in records], [r.metadata for r in records], [r.where for r in records])


class ShapesVerifierReward:
    """One of SHAPES_REWARDS' verifier scores ("ta", "geneval", "ta_exact" or "clean"), float32 [B]."""

    def __init__(self, kind: str = "ta"):
        kinds = tuple(SHAPES_REWARDS.values())
        if kind not in kinds:
            raise ValueError(f"shapes verifier score {kind!r} unknown; expected one of {kinds}")
        self.kind = kind

    def check_records(self, records) -> None:
        """Fail before training when a prompt's metadata is not about the shapes world (names its line)."""
        records_to_prompts(records)

    def __call__(self, images, prompts, metadata):
        ps = shapes_prompts(prompts, metadata)
        res = verify(images.float().cpu(), ps)
        if self.kind == "ta_exact":
            return ta_exact_scores(ps, res.checks, res.objects)
        if self.kind == "clean":
            return clean_scores(ps, res.checks, res.objects, stray_light(images.float().cpu(), res.objects))
        return (res.ta if self.kind == "ta" else res.geneval).float()
