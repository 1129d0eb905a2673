"""The comparisons' configuration: the methods (each a set of training overrides), CompareConfig and where
each run's files go."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from unigrpo.config import load_config, require_in, require_min, resolve_config_path
from unigrpo.data import build_prompt_source, check_rounds
from unigrpo.trainer import TrainConfig


@dataclass(frozen=True)
class Method:
    label: str
    """the name in tables and plots"""
    overrides: tuple[str, ...]
    """training-config overrides on top of the shared config"""
    eval_cfg: bool = False
    """also evaluate with CFG (the CFG comparison)"""
    note: str = ""


METHODS: dict[str, Method] = {
    "unigrpo": Method("UniGRPO", (), True,
                      "text GRPO + FlowGRPO, velocity MSE (β of the training config), RatioNorm, CFG-free rollouts"),
    "flowgrpo_only": Method("FlowGRPO only", ("loss.train_text=false",), False,
                            "reasoning sampled, text expert frozen"),
    "textgrpo_only": Method("TextGRPO only", ("loss.train_image=false",), False, "λ = 0, image expert frozen"),
    "refl": Method("ReFL", ("method=refl",), False,
                   "image expert trained through a differentiable surrogate of the verifier at a late step"),
    "refl_low_lr": Method("ReFL, lr/10", ("method=refl", "optim.lr_image=1e-5"), False,
                          "ReFL with a 10× smaller image learning rate (ReFL's own papers tune it down)"),
    "cfg_rollouts": Method("UniGRPO, CFG rollouts", ("rollout.cfg_scale={cfg_scale}",), True,
                           "training rollouts with CFG (2 evaluations per step)"),
    "reg_none": Method("UniGRPO, no regulariser", ("loss.reg=none",), False, "β irrelevant"),
    "reg_latent_kl": Method("UniGRPO, latent KL", ("loss.reg=latent_kl",), False,
                            "per-step Gaussian KL instead of velocity MSE, same β"),
    "ratio_norm_off": Method("UniGRPO, RatioNorm off", ("loss.ratio_norm=false",), False,
                             "plain ratio, same clip range"),
}
BASE = "base"
SWEEP_PREFIX = "beta="
"""a β-sweep run's method name: "beta=<β>", UniGRPO with velocity MSE at that β (CompareConfig.betas)"""
RESERVED = ("base", "out", "iterations", "seed", "method", "checkpoint_every", "resume")


@dataclass
class CompareConfig:
    out: str = "runs/compare"
    """run directory: base/, runs/<method>/seed<k>/"""
    report: str = ""
    """results markdown path (plots go to a folder named after it); default <out>/results.md"""
    pretrain: bool = False
    """pre-train the base now instead of copying the shipped one"""
    train_config: str = "tiny"
    """training config every method starts from (bundled name or YAML path)"""
    overrides: list[str] = field(default_factory=list)
    """extra key=value training overrides for every method (e.g. ["prompts_per_iter=4"])"""
    iterations: int = 30
    """training iterations per run (the budget)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """training seeds of every method"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to run (keys of unigrpo.compare.METHODS)"""
    betas: list[float] = field(default_factory=list)
    """β sweep: one more UniGRPO method per value (velocity MSE at that β), named "beta=<β>" (empty: none)"""
    jobs: int = 2
    """runs in parallel; each gets max(1, cores // jobs) torch threads"""
    eval_samples: int = 256
    """held-out prompts per evaluation (one image each)"""
    eval_steps: int = 50
    """ODE steps of evaluation sampling"""
    eval_seed: int = 1234
    """held-out prompts and noise, shared by every evaluation"""
    cfg_scale: float = 3.0
    """CFG scale of the "with CFG" evaluations and of the CFG-rollout ablation"""
    probe_samples: int = 64
    """probe contexts of the velocity-drift indicator"""

    def __post_init__(self):
        require_min("iterations", self.iterations, 1)
        require_min("jobs", self.jobs, 1)
        require_min("eval_samples", self.eval_samples, 1)
        require_min("probe_samples", self.probe_samples, 1)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        for m in self.methods:
            require_in("methods[]", m, list(METHODS))
        for b in self.betas:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
                raise ValueError(f"betas[] must be numbers > 0 (the sweep's velocity-MSE weights), got {b!r}")
        if len({float(b) for b in self.betas}) != len(self.betas):
            raise ValueError(f"betas must be distinct, got {self.betas}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct, got {self.methods}")
        for o in self.overrides:
            key = o.partition("=")[0].strip()
            if key in RESERVED or key.split(".")[0] == "method":
                raise ValueError(f"overrides may not set {key!r}: the comparison sets {sorted(RESERVED)} per run "
                                 "(use iterations=, seeds= or a method of METHODS instead)")
        if not self.cfg_scale > 1:
            raise ValueError(f"cfg_scale must be > 1 (1 is no CFG), got {self.cfg_scale}")

    @property
    def all_methods(self) -> list[str]:
        """The methods to run: `methods`, then the β sweep's "beta=<β>" in ascending β."""
        return list(self.methods) + [sweep_name(b) for b in sorted(self.betas)]

    @property
    def base(self) -> str:
        return os.path.join(self.out, "base")

    @property
    def report_path(self) -> str:
        return self.report or os.path.join(self.out, "results.md")


def shared_train_config(cfg: CompareConfig) -> TrainConfig:
    """The TrainConfig every method starts from (its `base` is where the comparison's base comes from, its
    `data.eval` what every run is evaluated on)."""
    return load_config(TrainConfig, resolve_config_path(cfg.train_config), list(cfg.overrides))


def episode_rounds_of(tc: TrainConfig) -> int:
    """R: rounds per episode of a TrainConfig's training prompts (1 unless multi-round, ALGORITHM.md §12)."""
    return check_rounds(build_prompt_source(tc.data.train, "train", tc.seed).records)


def sweep_name(beta: float) -> str:
    return f"{SWEEP_PREFIX}{float(beta):g}"


def sweep_beta(method: str) -> float | None:
    """β of a sweep method name, None for a method of METHODS."""
    return float(method[len(SWEEP_PREFIX):]) if method.startswith(SWEEP_PREFIX) else None


def method_spec(method: str) -> Method:
    """The Method behind a name: a key of METHODS or a β-sweep name "beta=<β>"."""
    beta = sweep_beta(method)
    if beta is not None:
        return Method(f"UniGRPO, β = {beta:g}", ("loss.reg=mse", f"loss.beta={beta:g}"), False,
                      "β sweep: velocity MSE at this weight")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)} or {SWEEP_PREFIX}<β>")
    return METHODS[method]


def run_dir(cfg: CompareConfig, method: str, seed: int | None) -> str:
    return os.path.join(cfg.out, "runs", BASE) if method == BASE else \
        os.path.join(cfg.out, "runs", method, f"seed{seed}")
