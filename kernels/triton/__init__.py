"""The Triton backend of unigrpo_kernels: flow.py (SDE step, flow-loss row sums) and token.py (fused token
log-probs). Imported lazily by the dispatching ops (kernels/flow.py, kernels/text.py) so that importing
unigrpo_kernels never needs triton."""
