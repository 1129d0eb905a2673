"""The unified model: config and presets, the packed layout, attention, the MoT decoder, the image codec."""
from unigrpo.model.config import PRESETS, ModelConfig, preset
from unigrpo.model.layout import PackedLayout, Segment, episode_document, no_text_head, padded_ids, text_then_blocks
from unigrpo.model.unified import KVCache, UnifiedModel

__all__ = ["PRESETS", "ModelConfig", "preset", "PackedLayout", "Segment", "episode_document", "no_text_head", "padded_ids", "text_then_blocks", "KVCache", "UnifiedModel"]
