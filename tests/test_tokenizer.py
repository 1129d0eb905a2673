"""Tests of unigrpo.model.tokenizer: the byte tokenizer (round trip over any text, specials, prompt/reasoning
layout) and the Hugging Face wrapper over a tiny byte-level BPE tokenizer that the test builds and saves
itself (no downloads)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unigrpo.model.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

MARKERS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<think>"]


def test_byte_specials_distinct_and_outside_bytes():
    tok = ByteTokenizer()
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.sor_id]
    assert len(set(specials)) == 4
    assert all(256 <= s < tok.vocab_size for s in specials)
    assert tok.vocab_size % 8 == 0


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_prompt(text)) == text
    assert tok.decode(tok.encode_reasoning(text)) == text


def test_byte_structure_and_non_ascii():
    tok = ByteTokenizer()
    text = "un carré rouge 🟥 à gauche"
    prompt = tok.encode_prompt(text)
    assert prompt[0] == tok.bos_id and prompt[-1] == tok.sor_id and prompt[1:-1] == list(text.encode())
    reasoning = tok.encode_reasoning(text)
    assert reasoning[-1] == tok.eos_id and reasoning[:-1] == list(text.encode())
    assert tok.decode(torch.tensor(prompt + [tok.pad_id] * 3)) == text  # tensors in, specials skipped
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # a cut multi-byte character is replaced


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer (256 byte symbols, no merges, five added special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": MARKERS[1:]})
    path = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(str(path))
    return path


def test_hf_round_trip_and_markers(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.vocab_size == 256 + len(MARKERS)
    ids = {tok.pad_id, tok.bos_id, tok.eos_id, tok.sor_id}
    assert len(ids) == 4 and all(256 <= i < tok.vocab_size for i in ids)
    assert tok.tok.convert_ids_to_tokens([tok.bos_id, tok.sor_id, tok.eos_id, tok.pad_id]) == \
        ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|endoftext|>"]
    for text in ["a red circle left of a blue square", "drei grüne Dreiecke ✓", ""]:
        assert tok.decode(tok.encode(text)) == text
        prompt = tok.encode_prompt(text)
        assert prompt[0] == tok.bos_id and prompt[-1] == tok.sor_id and tok.decode(prompt) == text
        assert tok.encode_reasoning(text)[-1] == tok.eos_id
    custom = build_tokenizer("hf", hf_dir, sor="<think>", eos="<|im_end|>")
    assert custom.tok.convert_ids_to_tokens([custom.sor_id, custom.eos_id]) == ["<think>", "<|im_end|>"]


def test_hf_errors(hf_dir, tmp_path):
    with pytest.raises(ValueError, match=r"sor='<nope>'"):
        HFTokenizer(hf_dir, sor="<nope>")
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir") as err:
        HFTokenizer(missing)
    assert "tokenizer.json" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*tokenizer_config.json"):
        HFTokenizer(tmp_path / "empty")


def test_build_tokenizer_kinds():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"'bpe'.*'byte', 'hf'"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="needs path"):
        build_tokenizer("hf")
    with pytest.raises(ValueError, match="takes no path"):
        build_tokenizer("byte", "some/dir")
