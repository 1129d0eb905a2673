"""The loss options (ALGORITHM.md §6–§8, §11): LossConfig for UniGRPO and its ablations, ReFLConfig for the ReFL
baseline. The allowed aggregations and regularisers are the kernels' own (one copy, in their references)."""
from __future__ import annotations

from dataclasses import dataclass

from unigrpo.config import require_min, require_positive
from unigrpo_kernels.reference.flow import LATENT_KL_NORMS, REGS
from unigrpo_kernels.reference.text import AGGREGATIONS, LOSS_TYPES

__all__ = ["AGGREGATIONS", "LOSS_TYPES", "REGS", "LossConfig", "ReFLConfig"]


@dataclass
class LossConfig:
    eps_lo: float = 0.2
    """text clip range below 1"""
    eps_hi: float = 0.2
    """text clip range above 1"""
    aggregation: str = "sequence"
    """text loss normaliser: "sequence", "token", "constant" or "global" (÷ the step's reasoning tokens, DAPO) (§6)"""
    loss_type: str | None = None
    """peer name that sets aggregation and ratio_level: grpo, bnpo, dr_grpo, dapo, gspo (docs/DESIGN.md table);
    None keeps `aggregation` with token ratios"""
    gspo_eps_lo: float = 3e-4
    """sequence-ratio clip range below 1 (ratio_level "sequence", GSPO paper: 3e-4)"""
    gspo_eps_hi: float = 4e-4
    """sequence-ratio clip range above 1 (GSPO paper: 4e-4)"""
    kl_coef: float = 0.0
    """weight of the k3 text KL to the reference (paper: 0)"""
    kl_bias_correction: bool = False
    """k3 × the importance ratio (not detached), TRL's use_bias_correction_kl (DeepSeek-V3.2); needs kl_coef > 0"""
    flow_clip: float = 1e-6
    """ε_f: flow ratio clip range"""
    flow_clip_lo: float | None = None
    """flow ratio clip range below 1 (ratio ≥ 1 − flow_clip_lo; Flow-GRPO Bagel's clip_range_lt); None = flow_clip"""
    flow_clip_hi: float | None = None
    """flow ratio clip range above 1 (ratio ≤ 1 + flow_clip_hi; Flow-GRPO Bagel's clip_range_gt); None = flow_clip"""
    beta: float = 1.5e-5
    """β: weight of the velocity regulariser"""
    reg: str = "mse"
    """regulariser: "mse" (velocity MSE), "latent_kl" or "none" (§8)"""
    latent_kl_norm: str = "project"
    """reg="latent_kl" only: "project" (÷ 2s², s the step std) or "flow_grpo" (÷ 2g², Flow-GRPO's, = h × project)"""
    ratio_norm: bool = True
    """RatioNorm on the flow ratio (§7)"""
    grad_reweight: bool = False
    """w_j = 1/h_j on flow steps (GRPO-Guard)"""
    flow_weight: float = 1.0
    """λ: weight of L_flow"""
    train_text: bool = True
    """train the text expert with L_text (false = FlowGRPO only)"""
    train_image: bool = True
    """train the image expert with L_flow (false = TextGRPO only)"""

    @property
    def ratio_level(self) -> str:
        """"sequence" (GSPO's one ratio per sequence) for loss_type gspo, else "token"."""
        return LOSS_TYPES[self.loss_type][1] if self.loss_type is not None else "token"

    def __post_init__(self):
        if self.loss_type is not None:
            if self.loss_type not in LOSS_TYPES:
                raise ValueError(f"loss.loss_type must be one of {tuple(LOSS_TYPES)} or None, got {self.loss_type!r}")
            self.aggregation = LOSS_TYPES[self.loss_type][0]
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.reg not in REGS:
            raise ValueError(f"loss.reg {self.reg!r} is not a known regulariser; expected one of {REGS}")
        if self.latent_kl_norm not in LATENT_KL_NORMS:
            raise ValueError(f"loss.latent_kl_norm must be one of {LATENT_KL_NORMS}, got {self.latent_kl_norm!r}")
        for name in ("eps_lo", "eps_hi", "flow_clip", "beta", "kl_coef", "flow_weight", "gspo_eps_lo", "gspo_eps_hi"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("flow_clip_lo", "flow_clip_hi"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"loss.{name} must be None (= loss.flow_clip) or >= 0, got {getattr(self, name)}")
        if not (self.train_text or (self.train_image and self.flow_weight > 0)):
            raise ValueError("nothing would be trained: need loss.train_text, or loss.train_image with "
                             f"loss.flow_weight > 0 (got train_text={self.train_text}, "
                             f"train_image={self.train_image}, flow_weight={self.flow_weight})")


@dataclass
class ReFLConfig:
    late_steps: int = 10
    """the gradient step is drawn uniformly from the last `late_steps` denoising steps"""
    softness: float = 16.0
    """edge width of the surrogate's soft colour membership (RGB distance units, unigrpo/rewards/surrogate.py)"""

    def __post_init__(self):
        require_min("refl.late_steps", self.late_steps, 1)
        require_positive("refl.softness", self.softness)
