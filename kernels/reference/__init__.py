"""The torch backend of unigrpo_kernels: the reference math of every op (ALGORITHM.md), float64-capable,
any device. Tests and benches import these; nobody copies them."""
from .flow import (StepCoeffs, flow_grpo_loss, flow_log_ratio, gaussian_logprob, ode_step, sde_step,
                   sigma_schedule, step_coeffs, step_coeffs_batch, step_mean, velocity_mse)
from .text import k3_kl, text_grpo_loss, token_logprobs

__all__ = [
    "StepCoeffs", "flow_grpo_loss", "flow_log_ratio", "gaussian_logprob", "ode_step", "sde_step",
    "sigma_schedule", "step_coeffs", "step_coeffs_batch", "step_mean", "velocity_mse",
    "k3_kl", "text_grpo_loss", "token_logprobs",
]
