"""The training run's configuration (configs/tiny.yaml, configs/paper.yaml): TrainConfig and its optimiser
group OptimConfig; the loss options are unigrpo.losses.config's."""
from __future__ import annotations

from dataclasses import dataclass, field

from unigrpo.config import require_positive
from unigrpo.data import DataConfig
from unigrpo.distributed import DistConfig
from unigrpo.losses.config import LossConfig, ReFLConfig
from unigrpo.model.attention import BACKENDS as ATTN_BACKENDS
from unigrpo.rewards.advantages import ADV_SCOPES, ADV_STDS
from unigrpo.rewards.registry import RewardSpec, normalise_rewards
from unigrpo.rollout.rollout import RolloutConfig
from unigrpo_kernels.dispatch import OP_BACKENDS

__all__ = ["METHODS", "EditConfig", "OptimConfig", "TrainConfig"]

METHODS = ("grpo", "refl")


@dataclass
class OptimConfig:
    lr_text: float = 1e-6
    """AdamW lr of the text expert + embeddings + lm_head"""
    lr_image: float = 3e-5
    """AdamW lr of the image expert + in/out projections + time embedding"""
    beta1: float = 0.9
    """AdamW β1"""
    beta2: float = 0.999
    """AdamW β2"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """global gradient-norm clip"""
    epochs: int = 2
    """K: PPO epochs over each batch"""
    minibatch: int = 16
    """trajectories per mini-batch (per optimizer step, per rank)"""
    microbatch: int | None = None
    """trajectories per forward/backward; a mini-batch's gradient is accumulated over its micro-batches (the
    same gradient as one pass, less activation memory). None: the whole mini-batch at once"""

    def __post_init__(self):
        for name in ("lr_text", "lr_image", "grad_clip"):
            require_positive(f"optim.{name}", getattr(self, name))
        if self.epochs < 1 or self.minibatch < 1:
            raise ValueError(f"optim.epochs and optim.minibatch must be >= 1, got {self.epochs}, {self.minibatch}")
        if self.microbatch is not None and not 1 <= self.microbatch <= self.minibatch:
            raise ValueError(f"optim.microbatch={self.microbatch} must be in [1, optim.minibatch={self.minibatch}] "
                             "(or null: the whole mini-batch at once)")

    @property
    def micro(self) -> int:
        """Trajectories per forward/backward."""
        return self.microbatch or self.minibatch


@dataclass
class EditConfig:
    """Multi-round episodes (ALGORITHM.md §12; data.train with `rounds`, e.g. "shapes_edit")."""
    round_weights: list[float] = field(default_factory=list)
    """w_r: the episode's reward is Σ_r w_r·R(x^r, T^r). Empty: only the final image, (0, …, 0, 1); else one
    weight per round, >= 0, not all 0"""
    text_rounds: list[int] = field(default_factory=list)
    """rounds (1-based) whose reasoning tokens enter L_text. Empty (default): every round, as §12 specifies;
    e.g. [2] trains only the final round's reasoning (an ablation of the credit round 1 gets for x²'s reward)"""
    history_grad: bool = False
    """let the losses train the encoding of the history images x̄^1 … x̄^{R−1} (the clean blocks later rounds
    condition on). False (default) holds it fixed: round r's text loss, whose gradient through x̄^{r−1} is
    10-40× the flow loss's own on the image expert, otherwise rewrites the denoiser (ALGORITHM.md §12)"""

    def __post_init__(self):
        w = [float(x) for x in self.round_weights]
        if any(not x >= 0 for x in w) or (w and not any(w)):
            raise ValueError(f"edit.round_weights={self.round_weights!r}: expected weights >= 0, not all 0 "
                             "(or [] for the final round only)")
        self.round_weights = w
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.text_rounds) or (
                len(set(self.text_rounds)) != len(self.text_rounds)):
            raise ValueError(f"edit.text_rounds={self.text_rounds!r}: expected distinct round numbers >= 1 "
                             "(or [] for every round)")

    def weights(self, rounds: int) -> list[float]:
        """The weights of an R-round episode (ValueError when the list has another length)."""
        if not self.round_weights:
            return [0.0] * (rounds - 1) + [1.0]
        if len(self.round_weights) != rounds:
            raise ValueError(f"edit.round_weights has {len(self.round_weights)} entries; the episodes have "
                             f"{rounds} rounds")
        return list(self.round_weights)

    def trained_rounds(self, rounds: int) -> list[int]:
        """0-based rounds whose reasoning L_text trains (ValueError for a round the episodes do not have)."""
        if not self.text_rounds:
            return list(range(rounds))
        if max(self.text_rounds) > rounds:
            raise ValueError(f"edit.text_rounds={self.text_rounds!r} names round {max(self.text_rounds)}; the "
                             f"episodes have {rounds} rounds")
        return sorted(k - 1 for k in self.text_rounds)


@dataclass
class TrainConfig:
    base: str = "runs/tiny/base"
    """base checkpoint directory: the initial policy and the frozen reference"""
    out: str = "runs/tiny/unigrpo"
    """run directory (checkpoint, metrics.jsonl, evals, report.md)"""
    iterations: int = 60
    """training iterations (rollout + update)"""
    prompts_per_iter: int = 8
    """B: prompts per iteration (each rolled out G times)"""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    method: str = "grpo"
    """"grpo" (UniGRPO and its ablations) or "refl" (the ReFL baseline: the image expert trained through a
    differentiable surrogate of the verifier at one late step; the text expert is not trained)"""
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """prompts: data.train and data.eval, "shapes" (the built-in world) or a .jsonl / .txt / .csv file"""
    edit: EditConfig = field(default_factory=EditConfig)
    rewards: list[RewardSpec | str] = field(default_factory=lambda: [RewardSpec("shapes_ta")])
    """the rewards, [{name, weight, ...}] (unigrpo/rewards/registry.py); their weighted sum trains"""
    adv_scope: str = "group"
    """advantage scale after centring on the group mean: std of the "group" (§5), of the whole "batch"
    (Flow-GRPO global_std), or "none" (centred only, TRL scale_rewards="none")"""
    adv_std: str = "population"
    """the std's divisor: "population" (n, §5 and Flow-GRPO's np.std) or "sample" (n − 1, TRL's torch.std)"""
    adv_clip: float | None = 5.0
    """clamp advantages to [−adv_clip, adv_clip] (§5); null disables (TRL and Flow-GRPO do not clamp)"""
    adv_group_by: str = "group"
    """"group": the G rollouts of one drawn prompt; "prompt": every row with the same prompt text, across
    groups and ranks (Flow-GRPO's PerPromptStatTracker)"""
    skip_zero_std: bool = True
    """drop groups whose rewards are all equal before training"""
    recompute_old: bool = True
    """recompute old log-probs with the training code path"""
    flow_backend: str = "auto"
    """kernel backend of sde_step and flow_grpo_loss: "auto", "torch", "triton" or "cuda\""""
    text_backend: str = "auto"
    """kernel backend of token_logprobs and text_grpo_loss: "auto", "torch" or "triton\""""
    attention_backend: str = "auto"
    """packed training attention: "auto" (flex on CUDA, sdpa on CPU), "sdpa", "flex", "split" or "flash"
    (needs flash-attn)"""
    seed: int = 0
    """seed of prompts, windows and sampling"""
    threads: int = 0
    """torch CPU threads (0 = default)"""
    checkpoint_every: int = 20
    """iterations between checkpoints (and one at the end)"""
    eval_every: int = 0
    """iterations between held-out evaluations (0 = only before/after in the demo)"""
    eval_samples: int = 256
    """held-out samples per evaluation"""
    eval_steps: int = 50
    """ODE steps of evaluation sampling"""
    eval_cfg_scale: float = 1.0
    """CFG scale of evaluation sampling"""
    resume: bool = True
    """continue from <out>/checkpoint when it exists"""

    def __post_init__(self):
        if self.iterations < 0 or self.prompts_per_iter < 1:
            raise ValueError(f"iterations must be >= 0 and prompts_per_iter >= 1, got {self.iterations}, "
                             f"{self.prompts_per_iter}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown; expected one of {METHODS}")
        if self.method == "refl":
            if self.refl.late_steps > self.rollout.steps:
                raise ValueError(f"refl.late_steps={self.refl.late_steps} exceeds rollout.steps={self.rollout.steps}")
            if self.loss.reg == "latent_kl":
                raise ValueError("method 'refl' regularises velocities: loss.reg must be 'mse' or 'none', "
                                 "got 'latent_kl' (a per-step Gaussian KL needs SDE transitions)")
            if self.rollout.cfg_scale != 1.0:
                raise ValueError(f"method 'refl' samples without CFG; got rollout.cfg_scale={self.rollout.cfg_scale}")
            if not self.loss.train_image:
                raise ValueError("method 'refl' trains the image expert; loss.train_image must be true")
            if self.rollout.sde_kind != "sde":
                raise ValueError("method 'refl' puts its step window at the last steps, where 'cps' has no noise; "
                                 f"use rollout.sde_kind=sde (got {self.rollout.sde_kind!r})")
        self.rewards = normalise_rewards(self.rewards)
        if self.adv_scope not in ADV_SCOPES:
            raise ValueError(f"adv_scope must be one of {ADV_SCOPES}, got {self.adv_scope!r}")
        if self.adv_std not in ADV_STDS:
            raise ValueError(f"adv_std must be one of {ADV_STDS}, got {self.adv_std!r}")
        if self.adv_clip is not None and not self.adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0 or null (no clamp), got {self.adv_clip!r}")
        if self.adv_group_by not in ("group", "prompt"):
            raise ValueError(f"adv_group_by must be 'group' or 'prompt', got {self.adv_group_by!r}")
        if self.attention_backend not in ("auto",) + ATTN_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}; expected one of "
                             f"{('auto',) + ATTN_BACKENDS}")
        for name, op in (("flow_backend", "flow_grpo_loss"), ("text_backend", "token_logprobs")):
            allowed = ("auto",) + OP_BACKENDS[op]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a backend of {op}; expected one of {allowed}")
        if self.checkpoint_every < 1 or self.eval_every < 0 or self.eval_samples < 1:
            raise ValueError("checkpoint_every must be >= 1, eval_every >= 0 and eval_samples >= 1")
