"""The model bundle: the unified model with the tokenizer and the image codec it was trained with."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from unigrpo.model.unified import UnifiedModel


@dataclass
class Bundle:
    model: UnifiedModel
    tokenizer: object
    """unigrpo.model.tokenizer: ByteTokenizer or HFTokenizer"""
    codec: object
    """unigrpo.model.codec: PixelCodec or FluxVAECodec"""
    tokenizer_spec: dict
    """how build_tokenizer rebuilds the tokenizer: {"kind": "byte"} or {"kind": "hf", "path": DIR}"""

    def checkpoint_config(self) -> dict:
        """What a checkpoint's config.json records so the bundle can be rebuilt."""
        return {"model": asdict(self.model.cfg), "tokenizer": dict(self.tokenizer_spec)}
