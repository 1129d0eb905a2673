"""Prompt data: where the prompts of training and evaluation come from (the built-in shapes world or the
user's own files) and the deterministic order in which training sees them."""
from unigrpo.data.prompts import (PROMPT_SUFFIXES, DataConfig, FilePromptSource, PromptFileError, PromptRecord,
                                  ShapesEditSource, ShapesPromptSource, build_prompt_source, check_prompt_lengths,
                                  check_rounds, edit_record, episode_rounds, instructions_of, load_prompt_file,
                                  shapes_records, tag_order, write_prompt_file)

__all__ = ["PROMPT_SUFFIXES", "DataConfig", "FilePromptSource", "PromptFileError", "PromptRecord",
           "ShapesEditSource", "ShapesPromptSource", "build_prompt_source", "check_prompt_lengths", "check_rounds",
           "edit_record", "episode_rounds", "instructions_of", "load_prompt_file",
           "shapes_records", "tag_order", "write_prompt_file"]
