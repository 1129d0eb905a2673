"""unigrpo_kernels: the ops of UniGRPO (ALGORITHM.md) — sde_step, flow_grpo_loss, token_logprobs,
text_grpo_loss — each with a `backend` argument: "torch" (the reference math in kernels/reference, the spec in
code), "triton" (kernels/triton), "cuda" (kernels/cuda, flow ops) or "auto" (the fastest available; logged),
and the fused linear_text_grpo_loss (hidden states → loss without the [tokens × vocab] logits).

Installed under the namespaced import name `unigrpo_kernels` (never a bare `kernels`, which transformers
would take for the Hugging Face kernels-hub package). The dispatching ops are re-exported here; the
reference functions stay importable from `unigrpo_kernels.reference`; `resolve_backend` (dispatch.py) is the
one place a backend is chosen.
"""
if __name__ == "kernels":   # imported by its folder name from a checkout's root: not ours to answer (_bare_name.py)
    from ._bare_name import hand_over

    hand_over(__file__)
else:
    from .dispatch import available_backends, resolve_backend
    from .flow import flow_grpo_loss, sde_step
    from .reference import (StepCoeffs, flow_log_ratio, gaussian_logprob, ode_step, sigma_schedule, step_coeffs,
                            step_coeffs_batch)
    from .text import linear_text_grpo_loss, text_grpo_loss, token_logprobs

    __all__ = [
        "sigma_schedule", "StepCoeffs", "step_coeffs", "step_coeffs_batch", "sde_step", "ode_step",
        "gaussian_logprob", "flow_log_ratio", "flow_grpo_loss", "token_logprobs", "text_grpo_loss",
        "linear_text_grpo_loss",
        "resolve_backend", "available_backends",
    ]
