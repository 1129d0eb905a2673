"""Tokenizers behind one small interface: a file-free byte tokenizer (the `tiny` preset) and a wrapper of a
Hugging Face tokenizer loaded from a local directory (BAGEL / Qwen2).

The interface (`Tokenizer`): `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `sor_id`, `encode(text)`,
`decode(ids)`, `encode_prompt(text)` = [bos] + text + [sor], `encode_reasoning(text)` = text + [eos].
Roles of the special tokens: bos opens the prompt, sor ("start of reasoning") ends the prompt, eos ("end of
reasoning") ends the reasoning text and means "the image follows"; pad fills batches and is never attended.

Decisions:
- ByteTokenizer: ids 0..255 are the UTF-8 bytes; pad=256, bos=257, eos=258, sor=259. `vocab_size` is 264:
  260 rounded up to a multiple of 8 (embedding rows; ids 260..263 are unused) — this matches the `tiny`
  preset's `vocab_size`. `decode` drops every id >= 256 and decodes with errors="replace", so any id sequence
  (even one cut inside a multi-byte character) decodes.
- HFTokenizer: loaded with `AutoTokenizer.from_pretrained(path, local_files_only=True)`; nothing is ever
  downloaded. The markers are single tokens named by constructor arguments. Defaults follow BAGEL's layout on
  a Qwen2 tokenizer: bos "<|im_start|>", sor "<|im_end|>" (a chat turn ends the prompt) and eos
  "<|vision_start|>" (the token BAGEL puts before an image). pad defaults to the tokenizer's own pad token,
  else eos. A marker the vocabulary lacks is a ValueError naming it. `decode` drops the marker ids and the
  tokenizer's special tokens. `encode` adds no special tokens of its own.
"""
from __future__ import annotations

import os
from typing import Iterable, Protocol

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "build_tokenizer", "TOKENIZER_KINDS"]

TOKENIZER_KINDS = ("byte", "hf")


class Tokenizer(Protocol):
    """What the rollout and the data pipeline use."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    sor_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def encode_prompt(self, text: str) -> list[int]: ...
    def encode_reasoning(self, text: str) -> list[int]: ...


def _ints(ids) -> list[int]:
    """ids as a list of Python ints (accepts lists, tuples and tensors)."""
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


class ByteTokenizer:
    """UTF-8 bytes plus four special tokens; needs no files."""

    kind = "byte"
    vocab_size = 264
    pad_id, bos_id, eos_id, sor_id = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        """text → its UTF-8 bytes as ids in [0, 256)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """ids → text; special / unused ids (>= 256) are skipped, bad UTF-8 is replaced (U+FFFD)."""
        return bytes(i for i in _ints(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def encode_prompt(self, text: str) -> list[int]:
        """[bos] + bytes + [sor]."""
        return [self.bos_id, *self.encode(text), self.sor_id]

    def encode_reasoning(self, text: str) -> list[int]:
        """bytes + [eos]."""
        return [*self.encode(text), self.eos_id]

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=264)"


_HF_FILES = "tokenizer.json, or vocab.json + merges.txt, or tokenizer.model; and tokenizer_config.json"


class HFTokenizer:
    """A transformers tokenizer from a local directory, with configurable single-token markers."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, bos: str = "<|im_start|>", sor: str = "<|im_end|>",
                 eos: str = "<|vision_start|>", pad: str | None = None):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory not found: {path} (expected it to hold {_HF_FILES})")
        present = set(os.listdir(path))
        has_model = ("tokenizer.json" in present or {"vocab.json", "merges.txt"} <= present
                     or "tokenizer.model" in present)
        if not has_model or "tokenizer_config.json" not in present:
            raise FileNotFoundError(f"tokenizer files missing in {path}: expected {_HF_FILES}; "
                                    f"found {sorted(present) or 'nothing'}")
        from transformers import AutoTokenizer  # imported lazily: the byte tokenizer must not pay for it

        self.path = path
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if pad is None:
            pad = self.tok.pad_token if self.tok.pad_token is not None else eos
        vocab = self.tok.get_vocab()
        markers = {"bos": bos, "sor": sor, "eos": eos, "pad": pad}
        unknown = [f"{role}={tok!r}" for role, tok in markers.items() if tok not in vocab]
        if unknown:
            raise ValueError(f"tokenizer at {path} does not know the marker token(s) {', '.join(unknown)}; "
                             "pass markers that are single tokens of its vocabulary")
        self.markers = markers
        self.bos_id, self.sor_id, self.eos_id, self.pad_id = (vocab[bos], vocab[sor], vocab[eos], vocab[pad])
        self.vocab_size = len(self.tok)
        self._skip = {self.bos_id, self.sor_id, self.eos_id, self.pad_id, *self.tok.all_special_ids}

    def encode(self, text: str) -> list[int]:
        """text → ids, with no special tokens added."""
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        """ids → text; markers and the tokenizer's special tokens are skipped."""
        return self.tok.decode([i for i in _ints(ids) if i not in self._skip], skip_special_tokens=True)

    def encode_prompt(self, text: str) -> list[int]:
        """[bos] + tokens + [sor]."""
        return [self.bos_id, *self.encode(text), self.sor_id]

    def encode_reasoning(self, text: str) -> list[int]:
        """tokens + [eos]."""
        return [*self.encode(text), self.eos_id]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, markers={self.markers})"


def build_tokenizer(kind: str, path: str | os.PathLike | None = None, **kw) -> ByteTokenizer | HFTokenizer:
    """kind "byte" (no path) or "hf" (a local directory; **kw are HFTokenizer's marker arguments)."""
    if kind == "byte":
        if path or kw:
            raise ValueError(f"the byte tokenizer takes no path or options, got path={path!r} {kw or ''}")
        return ByteTokenizer()
    if kind == "hf":
        if not path:
            raise ValueError("tokenizer kind 'hf' needs path= a local tokenizer directory")
        return HFTokenizer(path, **kw)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(map(repr, TOKENIZER_KINDS))}")
