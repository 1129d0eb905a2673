"""Held-out evaluation: per-tag scores with 95% intervals, and an image grid.

Two paths, chosen by the prompt source and the rewards:
- the shapes world (`data.eval=shapes`, no `rewards`): its verifier's per-category TA-style and GenEval-style
  scores, the strict check and the reward-hacking indicators, as before; `data.eval=shapes_edit` gives the
  same table per edit kind, for the final image against the edited target;
- any prompt file (`data.eval=FILE`), or any `rewards`: the mean of each reward (and of their weighted total)
  per tag and overall. A file whose GenEval metadata is all about the shapes world gets the three verifier
  rewards when no `rewards` are given.

Evaluation sampling is the ODE path (ALGORITHM.md §4: 50 Euler steps, optional CFG); the reasoning is sampled
at the policy's temperature (what RL optimises), so two runs with the same seed see the same noise.
Intervals: Wilson score interval for the GenEval-style (0/1) score; mean ± 1.96·s/√n for the TA-style
fraction (clipped to [0, 1]) and for rewards (not clipped: a CLIP score lives in [−1, 1]).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from unigrpo.config import require_in
from unigrpo.data import (DataConfig, PromptRecord, build_prompt_source, check_prompt_lengths, check_rounds,
                          episode_rounds, instructions_of, tag_order)
from unigrpo.data.prompts import BUILTIN
from unigrpo.io import write_text_atomic
from unigrpo.rewards.registry import RewardSet, RewardSpec
from unigrpo.rewards.verifier import records_to_prompts
from unigrpo.rollout.generate import sample, sample_episode
from unigrpo.viz import save_image_grid
from unigrpo.world import (CATEGORIES, EDIT_KINDS, EditTask, edit_pretrain_example, make_prompts, parse_plan,
                           verify, verify_plans)
from unigrpo.world.geneval import is_shapes_metadata
from unigrpo.world.prompts import SPLITS
from unigrpo.world.render import to_uint8
from unigrpo.model import no_text_head, text_then_blocks
from unigrpo.world.data import pretrain_example
from unigrpo.world.render import to_float

REASONING = ("sampled", "oracle")
TOTAL = "total"
"""the weighted sum of the rewards, in reward tables"""
@dataclass
class EvalConfig:
    checkpoint: str = "runs/tiny/base"
    """checkpoint directory to evaluate"""
    samples: int = 256
    """held-out prompts (one image each)"""
    seed: int = 1234
    """seed of the held-out prompts and of the sampling noise"""
    temperature: float = 1.0
    """reasoning sampling temperature (0 = greedy)"""
    steps: int = 50
    """ODE denoising steps"""
    shift: float = 3.0
    """timestep shift s of the schedule"""
    cfg_scale: float = 1.0
    """classifier-free guidance scale (1 = none)"""
    batch: int = 128
    """prompts per sampling batch"""
    split: str = "heldout"
    """which split of the world's prompts (data.eval "shapes" / "shapes_edit") to score: "heldout", or "train"
    (the prompts and edit tasks training draws from, to tell a gain that does not transfer from none at all)"""
    reasoning: str = "sampled"
    """"sampled" (the policy's own reasoning) or "oracle": the shapes world's correct plan for each prompt (for
    its two-round edits, the plans of both rounds), so the image expert alone is scored (the most that training
    only the text expert could reach)"""
    out: str = ""
    """where to write eval.json and the grid (default: <checkpoint>/eval)"""
    grid: int = 48
    """images in the grid PNG"""
    data: DataConfig = field(default_factory=DataConfig)
    """prompts: data.eval is "shapes" (the world's held-out split) or a .jsonl / .txt / .csv file; for a file,
    `samples` images are drawn cycling through its prompts in file order (data.train is not used here)"""
    rewards: list[RewardSpec | str] = field(default_factory=list)
    """rewards to score with (as in training); empty: the shapes verifier's table"""

    def __post_init__(self):
        for name in ("samples", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        require_in("eval.reasoning", self.reasoning, REASONING)
        require_in("eval.split", self.split, SPLITS)
        if self.split != "heldout" and self.data.eval not in BUILTIN:
            raise ValueError(f"eval.split={self.split!r} picks a split of the shapes world's prompts; data.eval="
                             f"{self.data.eval!r} is a prompt file, which has no splits (leave split 'heldout')")
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0, got {self.temperature}")


@dataclass
class EvalResult:
    categories: list[str]
    ta: np.ndarray  # [n] float
    geneval: np.ndarray  # [n] float (0/1)
    prompts: list[str]
    reasoning: list[str]
    images: np.ndarray  # uint8 [n, H, W, 3]
    summary: dict = field(default_factory=dict)
    strict: np.ndarray | None = None  # [n] float (0/1): GenEval-style and exactly the asked-for objects
    scores: dict[str, np.ndarray] | None = None  # reward path: {label or "total": [n] float}
    round_reasoning: list[list[str]] | None = None  # episodes: [n][R] every round's reasoning (the last = reasoning)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(x: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    if len(x) < 2:
        return (0.0, 1.0)
    h = z * float(np.std(x, ddof=1)) / math.sqrt(len(x))
    return (max(0.0, float(x.mean()) - h), min(1.0, float(x.mean()) + h))


def summarize(categories: list[str], ta: np.ndarray, geneval: np.ndarray, strict: np.ndarray | None = None) -> dict:
    """{category or "overall": {n, ta, ta_ci, geneval, geneval_ci[, strict, strict_ci]}}; "overall" is over all
    samples."""
    out = {}
    cats = np.array(categories)
    for name in tag_order(categories) + ["overall"]:
        sel = np.ones(len(cats), bool) if name == "overall" else cats == name
        t, g = ta[sel], geneval[sel]
        out[name] = {"n": int(sel.sum()), "ta": float(t.mean()), "ta_ci": mean_ci(t),
                     "geneval": float(g.mean()), "geneval_ci": wilson(float(g.sum()), int(sel.sum()))}
        if strict is not None:
            out[name]["strict"] = float(strict[sel].mean())
            out[name]["strict_ci"] = wilson(float(strict[sel].sum()), int(sel.sum()))
    return out


def image_statistics(images: np.ndarray) -> dict[str, float]:
    """Reward-hacking indicators on uint8 [n, H, W, 3] images, to compare with the base model's: mean
    saturation (max − min channel, in [0, 1]), mean edge energy (|∂x| + |∂y| of the grey image, in [0, 2]) and
    the lit fraction (pixels brighter than 1/8 in any channel)."""
    x = images.astype(np.float32) / 255.0
    sat = x.max(-1) - x.min(-1)
    grey = x.mean(-1)
    edges = np.abs(np.diff(grey, axis=1))[:, :, :-1] + np.abs(np.diff(grey, axis=2))[:, :-1, :]
    return {"saturation": float(sat.mean()), "edge_energy": float(edges.mean()),
            "lit_fraction": float((x.max(-1) > 0.125).mean())}


SCORES = (("ta", "TA-style"), ("geneval", "GenEval-style"), ("strict", "strict"))
"""the shapes table's scores, in column order; strict = GenEval-style and exactly the asked-for objects"""


def _cell(s: dict, key: str) -> str:
    return f"{s[key]:.3f} [{s[key + '_ci'][0]:.3f}, {s[key + '_ci'][1]:.3f}]"


def format_table(summary: dict, title: str = "") -> str:
    """One row per category: TA-style, GenEval-style and (when scored) strict, each mean [95% interval]."""
    rows = [title] if title else []
    overall = summary.get("overall", {})
    keys = [(k, name) for k, name in SCORES if k in overall]
    rows.append(f"{'category':<14} {'n':>4}" + "".join(f"  {name:>22}" for _, name in keys))
    for name, s in summary.items():
        rows.append(f"{name:<14} {s['n']:>4}" + "".join(f"  {_cell(s, k):>22}" for k, _ in keys))
    if "strict" in overall:
        rows.append("strict: GenEval-style and exactly the asked-for objects (extra objects and blobs fail it)")
    if "plan_valid" in overall:
        exact = f"; exactly a correct plan: {overall['plan_exact']:.1%}" if "plan_exact" in overall else ""
        if "plan_exact_rounds" in overall:
            exact += " (per round: " + ", ".join(f"{k}: {x:.1%}" for k, x in
                                                 enumerate(overall["plan_exact_rounds"], 1)) + ")"
        rows.append(f"reasoning that parses as a layout plan: {overall['plan_valid']:.1%}{exact}")
    if "images" in overall:
        st = overall["images"]
        rows.append(f"images: saturation {st['saturation']:.3f}, edge energy {st['edge_energy']:.4f}, "
                    f"lit fraction {st['lit_fraction']:.3f}")
    return "\n".join(rows)


def score_changes(before: dict, after: dict, arrow: str = "->") -> str:
    """Before → after of the shapes table's overall scores (strict, GenEval-style, TA-style), one line."""
    b, a = before["overall"], after["overall"]
    parts = [f"{name} {_cell(b, k)} {arrow} {_cell(a, k)} ({a[k] - b[k]:+.3f})"
             for k, name in reversed(SCORES) if k in a and k in b]
    return "; ".join(parts)


def reward_ci(x: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """mean ± z·s/√n over the finite entries, unclipped (rewards have any range); (nan, nan) below 2."""
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float("nan"), float("nan"))
    h = z * float(np.std(x, ddof=1)) / math.sqrt(len(x))
    return (float(x.mean()) - h, float(x.mean()) + h)


def summarize_rewards(tags: list[str], scores: dict[str, np.ndarray]) -> dict:
    """{tag or "overall": {"n": images, "rewards": {label: {"mean", "ci", "n"}}}}; NaN (abstained) entries are
    left out of that reward's mean and count."""
    out = {}
    arr = np.array(tags)
    for name in tag_order(tags) + ["overall"]:
        sel = np.ones(len(arr), bool) if name == "overall" else arr == name
        out[name] = {"n": int(sel.sum()), "rewards": {}}
        for label, x in scores.items():
            v = x[sel]
            ok = np.isfinite(v)
            out[name]["rewards"][label] = {"mean": float(v[ok].mean()) if ok.any() else float("nan"),
                                           "ci": reward_ci(v), "n": int(ok.sum())}
    return out


def format_reward_table(summary: dict, title: str = "") -> str:
    """One row per tag, one column per reward: mean [95% interval]."""
    labels = list(summary["overall"]["rewards"])
    width = max([14] + [len(t) + 1 for t in summary])
    rows = [title] if title else []
    rows.append(f"{'tag':<{width}} {'n':>5}" + "".join(f"  {lab:>24}" for lab in labels))
    for name, s in summary.items():
        cells = []
        for lab in labels:
            r = s["rewards"][lab]
            cells.append(f"{r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
        rows.append(f"{name:<{width}} {s['n']:>5}" + "".join(f"  {c:>24}" for c in cells))
    return "\n".join(rows)


def format_summary(summary: dict, title: str = "") -> str:
    """The table of either evaluation path."""
    return format_reward_table(summary, title) if is_reward_summary(summary) else format_table(summary, title)


def is_reward_summary(summary: dict) -> bool:
    return "rewards" in summary.get("overall", {})


def headline(summary: dict) -> tuple[str, float]:
    """The one held-out number a curve plots: GenEval-style on the shapes table, else the total reward."""
    if is_reward_summary(summary):
        r = summary["overall"]["rewards"]
        label = TOTAL if TOTAL in r else summary["overall"].get("headline", next(iter(r)))
        return (label if label != TOTAL else "total reward", r[label]["mean"])
    return ("GenEval-style", summary["overall"]["geneval"])


def eval_reward_set(cfg: EvalConfig, records: list[PromptRecord]) -> RewardSet | None:
    """The rewards an evaluation scores with: cfg.rewards; for a file without rewards whose metadata is all
    shapes-world GenEval, the three verifier rewards; None for the shapes world's own table."""
    if cfg.rewards:
        return RewardSet(cfg.rewards)
    if cfg.data.eval in ("shapes", "shapes_edit"):
        return None
    if all(is_shapes_metadata(r.metadata) for r in records):
        return RewardSet([RewardSpec("shapes_ta", weight=0.0), "shapes_geneval", RewardSpec("shapes_exact", weight=0.0)])
    raise ValueError(f"data.eval={cfg.data.eval!r}: its prompts are not all shapes-world GenEval metadata, so "
                     "give the rewards to score with, e.g. rewards=[{name: clip, path: /models/clip}]")


def oracle_episode_plans(records: list[PromptRecord], rng: np.random.Generator) -> list[list[str]]:
    """The world's correct plans [2][B] for two-round shapes-world editing episodes: an exact layout of the
    source, then that layout with the edit applied (edit_layout). ValueError for other episodes."""
    plans: list[list[str]] = [[], []]
    for rec in records:
        rounds = episode_rounds(rec)
        if len(rounds) != 2 or rec.tag not in EDIT_KINDS:
            raise ValueError(f"{rec.where}: eval.reasoning='oracle' knows the correct plans of the shapes world's "
                             f"two-round edits (tags {EDIT_KINDS}) only; got {len(rounds)} rounds, tag {rec.tag!r}")
        source, target = records_to_prompts(rounds)
        task = EditTask(source=source, instruction=instructions_of(rec)[0], kind=rec.tag, target=target)
        first, _, second, _ = edit_pretrain_example(task, rng)
        plans[0].append(first)
        plans[1].append(second)
    return plans


@torch.no_grad()
def evaluate(bundle, cfg: EvalConfig, progress: bool = True) -> EvalResult:
    """Sample one image per held-out prompt and score it (the module docstring's two paths)."""
    source = build_prompt_source(cfg.data.eval, "train" if cfg.split == "train" else "eval", cfg.seed)
    records = source.eval_records(cfg.samples, cfg.seed)
    check_prompt_lengths(records, bundle.tokenizer, bundle.model.cfg.max_text_len)
    episodes = check_rounds(records) > 1   # multi-round: score the final image against the final target (§12)
    targets = [episode_rounds(r)[-1] for r in records] if episodes else records
    rewards = eval_reward_set(cfg, targets)
    model = bundle.model
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(cfg.seed)
    oracle = None
    if cfg.reasoning == "oracle":   # the world's correct plans, seeded by the evaluation seed
        rng = np.random.default_rng(cfg.seed)
        oracle = (oracle_episode_plans(records, rng) if episodes else
                  [[pretrain_example(p, rng, flaw_prob=0.0)[0] for p in records_to_prompts(records)]])
    shapes = [] if rewards is None else None
    weighted = [] if rewards is None else [sp for sp in rewards.specs if sp.weight != 0]
    show_total = not (len(weighted) == 1 and weighted[0].weight == 1.0)   # else it equals that reward
    per: dict[str, list] = {}
    texts, imgs, finals, all_rounds = [], [], [], []
    for i in tqdm(range(0, len(records), cfg.batch), desc="eval", disable=not progress, leave=False):
        chunk = records[i:i + cfg.batch]
        if episodes:
            rounds, per_round = sample_episode(model, bundle.tokenizer, bundle.codec, [r.text for r in chunk],
                                               [instructions_of(r) for r in chunk], temperature=cfg.temperature,
                                               num_steps=cfg.steps, shift=cfg.shift, cfg_scale=cfg.cfg_scale,
                                               generator=gen, reasoning=None if oracle is None else
                                               [x[i:i + cfg.batch] for x in oracle])
            reasoning, images = rounds[-1], per_round[-1].float().cpu()
            all_rounds += [list(x) for x in zip(*rounds)]
            shown = to_uint8(torch.cat([x.float().cpu() for x in per_round], dim=-1))   # x¹ | … | x^R side by side
            chunk = targets[i:i + cfg.batch]
        else:
            reasoning, images = sample(model, bundle.tokenizer, bundle.codec, [r.text for r in chunk],
                                       temperature=cfg.temperature, num_steps=cfg.steps, shift=cfg.shift,
                                       cfg_scale=cfg.cfg_scale, generator=gen,
                                       reasoning=None if oracle is None else oracle[0][i:i + cfg.batch])
            images = images.float().cpu()
            shown = to_uint8(images)
        if rewards is None:
            res = verify(images, records_to_prompts(chunk))
            shapes.append((res.ta.numpy(), res.geneval.numpy(), res.strict.numpy()))
        else:
            total, each, _ = rewards(images, [r.text for r in chunk], [r.metadata for r in chunk])
            for label, x in [*each.items()] + ([(TOTAL, total)] if show_total else []):
                per.setdefault(label, []).append(x.numpy())
        texts += reasoning
        imgs.append(shown)
        finals.append(to_uint8(images))
    model.train(was_training)
    tags = [r.tag for r in records]
    images = np.concatenate(imgs)
    shown_prompts = [r.text if not episodes else f"{r.text} > {' > '.join(instructions_of(r))}" for r in records]
    if rewards is not None:
        scores = {k: np.concatenate(v) for k, v in per.items()}
        summary = summarize_rewards(tags, scores)
        summary["overall"]["headline"] = TOTAL if show_total else weighted[0].label
        return EvalResult(tags, None, None, shown_prompts, texts, images, summary, None, scores)
    ta_a, ge_a, st_a = (np.concatenate(x) for x in zip(*shapes))
    summary = summarize(tags, ta_a, ge_a, st_a)
    # reward-hacking indicators: reasoning that no longer parses as a layout plan, the strict check above,
    # and image statistics to compare with the base model's
    summary["overall"]["plan_valid"] = float(np.mean([parse_plan(t) is not None for t in texts]))
    # and what explains a strict gain: how often the (final round's) reasoning is exactly a correct plan
    summary["overall"]["plan_exact"] = float(verify_plans(texts, records_to_prompts(targets)).mean())
    if episodes:   # round k's plan against round k's target: which round's reasoning a change comes from
        summary["overall"]["plan_exact_rounds"] = [
            float(verify_plans([r[k] for r in all_rounds],
                               records_to_prompts([episode_rounds(rec)[k] for rec in records])).mean())
            for k in range(len(all_rounds[0]))]
    summary["overall"]["images"] = image_statistics(np.concatenate(finals))
    return EvalResult(tags, ta_a, ge_a, shown_prompts, texts, images, summary, st_a,
                      round_reasoning=all_rounds if episodes else None)


def write_eval(result: EvalResult, out_dir: str, grid: int = 48) -> dict:
    """eval.json (summary + per-sample rows) and grid.png under out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    n = len(result.prompts)
    if result.scores is not None:
        extra = [{k: (None if not np.isfinite(v[i]) else float(v[i])) for k, v in result.scores.items()}
                 for i in range(n)]
        ok = None
    else:
        strict = result.strict if result.strict is not None else [None] * n
        extra = [{"ta": float(t), "geneval": float(g), "strict": None if x is None else float(x)}
                 for t, g, x in zip(result.ta, result.geneval, strict)]
        # frame: green passes strict, amber passes GenEval-style only, red fails
        ok = [int(bool(g)) + int(bool(g) and x is not None and bool(x)) for g, x in zip(result.geneval, strict)]
    rows = [{"prompt": p, "category": c, "reasoning": r, **e}
            for p, c, r, e in zip(result.prompts, result.categories, result.reasoning, extra)]
    if result.round_reasoning is not None:
        for row, rr in zip(rows, result.round_reasoning):
            row["round_reasoning"] = rr
    path = write_text_atomic(os.path.join(out_dir, "eval.json"),
                             json.dumps({"summary": result.summary, "samples": rows}, indent=1))
    k = min(grid, n)
    # one column per tag (at most 8) so the grid reads as a table
    tags = tag_order(result.categories)[:8]
    per_tag = {t: [i for i in range(n) if result.categories[i] == t] for t in tags}
    picks = [i for j in range(k) for t in tags for i in per_tag[t][j:j + 1]][:k]
    grid_path = save_image_grid(result.images[picks], [f"{result.prompts[i]} | {result.reasoning[i]}" for i in picks],
                                os.path.join(out_dir, "grid.png"), ncol=len(tags),
                                ok=None if ok is None else [ok[i] for i in picks])
    return {"json": path, "grid": grid_path}


@torch.no_grad()
def velocity_drift(model, ref_model, tokenizer, codec, samples: int = 64, seed: int = 4321,
                   sigmas: tuple[float, ...] = (0.25, 0.5, 0.75), backend: str = "sdpa") -> float:
    """Reward-hacking indicator: mean squared difference of the two models' velocities, (1/(n·D))·Σ‖v − v_ref‖²,
    on a fixed probe set: held-out prompts with a correct plan (pretraining format, no flaws) and the render
    of that plan, noised to each σ with seeded noise (x_σ = (1−σ)·x0 + σ·ε). 0 for the reference itself;
    the same probe for every model evaluated with the same (samples, seed)."""
    prompts = make_prompts("heldout", samples, seed=seed)
    rng = np.random.default_rng(seed)
    plans, imgs = zip(*(pretrain_example(p, rng, flaw_prob=0.0) for p in prompts))
    dev = model.embed.weight.device
    x0 = codec.encode(to_float(np.stack(imgs)).to(dev))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn((len(sigmas),) + tuple(x0.shape), generator=gen).to(dev)
    sig = torch.tensor(sigmas, dtype=torch.float32, device=dev)
    lat = ((1 - sig.view(-1, 1, 1, 1, 1)) * x0[None] + sig.view(-1, 1, 1, 1, 1) * eps).transpose(0, 1)  # [n, K, ...]
    ctx = [tokenizer.encode_prompt(p.text) + tokenizer.encode_reasoning(plan) for p, plan in zip(prompts, plans)]
    layout, ids = text_then_blocks(ctx, len(sigmas), model.cfg.image_tokens, tokenizer.pad_id, device=dev)
    lat_M, sig_M = lat.flatten(0, 1), sig.repeat(len(ctx))
    diffs = []
    for m in (model, ref_model):
        was = m.training
        m.eval()
        _, v = m.forward_packed(layout, ids, lat_M.to(m.embed.weight.dtype), sig_M, backend=backend,
                                text_head=no_text_head)
        m.train(was)
        diffs.append(v.float())
    return float(((diffs[0] - diffs[1]) ** 2).mean())
