"""unigrpo: train one unified model to reason in text and then generate an image, with GRPO on the text
tokens and FlowGRPO on the denoising steps (see docs/ALGORITHM.md)."""

__version__ = "0.1.0"
