"""One small tokenizer interface over SentencePiece models and Hugging Face tokenizer directories.

`load_tokenizer(path)`:
  * a SentencePiece `.model` file  -> the `sentencepiece` library directly;
  * a directory with `tokenizer.json` or `tokenizer.model` (a LLaMA checkout, an exported run)
    -> `transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`. Never
    `LlamaTokenizer(vocab_file=...)`: with transformers 5 it can silently return empty ids.

`encode` never adds BOS/EOS and never turns text such as "</s>" into a special id: templates
place special tokens themselves, as ids.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence

from imitation_jax.data.formats import DataError


class Tokenizer(abc.ABC):
    """Text <-> ids. Subclasses set the special ids; `pad_id` falls back to 0 (never trained)."""

    path: str
    bos_id: int | None  # None: the tokenizer has no BOS and templates start without one
    eos_id: int
    pad_id: int
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS; special-token strings in it stay plain text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (BOS/EOS/pad) decode to nothing."""

    @property
    def prepends_space(self) -> bool:
        """Whether `encode` starts every text as a new word, as SentencePiece's dummy prefix does.

        Then "a b" tokenizes as encode("a") + encode("b"), and a segment's leading space must be
        dropped before encoding it alone (else it is encoded twice). Byte-level BPE tokenizers
        (LLaMA-3, GPT-2) give False: there the space has to be part of the next segment.
        Measured once rather than read from a config, so it holds for any tokenizer.
        """
        if not hasattr(self, "_prepends_space"):
            self._prepends_space = (
                self.encode("hello world") == self.encode("hello") + self.encode("world"))
        return self._prepends_space

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"{path}: not a readable SentencePiece model ({_one_line(e)})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self._sp.eos_id() < 0:
            raise DataError(f"{path}: tokenizer has no EOS token")
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = path
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad directory
            raise DataError(f"{path}: cannot load tokenizer ({_one_line(e)})") from None
        self.vocab_size = len(self._tok)
        self.bos_id = self._tok.bos_token_id
        if self._tok.eos_token_id is None:
            raise DataError(f"{path}: tokenizer has no EOS token")
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a literal "</s>" in a conversation must not become the EOS id.
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A SentencePiece `.model` file, or a directory holding `tokenizer.json`/`tokenizer.model`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f))
                   for f in ("tokenizer.json", "tokenizer.model")):
            raise DataError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")
        return HFTokenizer(path)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    raise DataError(f"{path}: no such tokenizer file or directory")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__
