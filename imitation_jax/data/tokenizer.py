"""One small tokenizer interface over SentencePiece models and Hugging Face tokenizer directories.

`load_tokenizer(path)`:
  * a SentencePiece `.model` file  -> the `sentencepiece` library directly;
  * a directory with `tokenizer.json` or `tokenizer.model` (a LLaMA checkout, an exported run)
    -> `transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`. Never
    `LlamaTokenizer(vocab_file=...)`: with transformers 5 it can silently return empty ids;
  * a directory saved by `Tokenizer.save` (the `tokenizer/` of a prepared data set): the
    tokenizer it copied plus the special tokens added to it.

`encode` never adds BOS/EOS and never turns text such as "</s>" or "<|im_end|>" into a special id:
templates place special tokens themselves, as ids.

Special tokens a template needs that the tokenizer lacks (`<|im_start|>` on a LLaMA-2 tokenizer,
the turn tokens `<|user|>` / `<|assistant|>`) are added with `add_special_tokens`: they get the ids
after the tokenizer's own (`vocab_size` grows; a model's embedding must grow to match) and are
saved with the prepared data, so training and inference use the same ids.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence

from imitation_jax.errors import DataError

SAVED = "imitation_tokenizer.json"  # marks a directory written by Tokenizer.save


class Tokenizer(abc.ABC):
    """Text <-> ids. Subclasses set the special ids; `pad_id` falls back to 0 (never trained)."""

    path: str
    bos_id: int | None  # None: the tokenizer has no BOS and templates start without one
    eos_id: int
    pad_id: int
    base_vocab_size: int  # the tokenizer's own ids
    added_tokens: dict[str, int]  # special tokens added on top, in id order

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.added_tokens)

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS; special-token strings in it stay plain text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (BOS/EOS/pad and added ones) decode to nothing."""

    @abc.abstractmethod
    def _own_special_id(self, token: str) -> int | None:
        """The id of `token` if the tokenizer itself has it as a single (special) token."""

    @abc.abstractmethod
    def _files(self) -> list[str]:
        """The files that define the tokenizer (copied by `save`, hashed by `fingerprint`)."""

    def token_bytes(self, i: int) -> bytes | None:
        """The bytes id `i` stands for inside a decoded text: a SentencePiece piece "▁x" is b" x", a
        byte-fallback piece <0xE2> the byte b"\\xe2", a byte-level BPE piece "Ġx" b" x". None for a
        token that adds nothing to the text: special, control and unknown ones, and those
        `add_special_tokens` added. The space decoding drops from a text's first piece
        (SentencePiece's dummy prefix) is kept: callers drop it where decoding does."""
        i = int(i)
        if not 0 <= i < self.base_vocab_size:
            return None
        cache = self.__dict__.setdefault("_bytes_cache", {})
        if i not in cache:
            cache[i] = self._token_bytes(i)
        return cache[i]

    def first_token_bytes(self, i: int) -> tuple[bytes | None, bool]:
        """`token_bytes(i)` as the first piece of a decoded text, and whether a leading space was
        dropped there (decoding drops SentencePiece's dummy prefix from a text's first piece)."""
        b = self.token_bytes(i)
        if b is None or not b.startswith(b" "):
            return b, False
        cache = self.__dict__.setdefault("_strip_cache", {})
        if i not in cache:
            cache[i] = not self.decode([int(i)]).startswith(" ")
        return (b[1:], True) if cache[i] else (b, False)

    def piece(self, i: int) -> str:
        """Id `i`'s own string: the tokenizer's piece, an added token's name ("<I>" for no id)."""
        i = int(i)
        if 0 <= i < self.base_vocab_size:
            return self._piece(i)
        return next((t for t, j in self.added_tokens.items() if j == i), f"<{i}>")

    @abc.abstractmethod
    def _token_bytes(self, i: int) -> bytes | None:
        """`token_bytes` of one of the tokenizer's own ids."""

    @abc.abstractmethod
    def _piece(self, i: int) -> str:
        """`piece` of one of the tokenizer's own ids."""

    def special_id(self, token: str) -> int | None:
        """Id of a special token string (its own, or one added), None if it has none."""
        if token in self.added_tokens:
            return self.added_tokens[token]
        cache = self.__dict__.setdefault("_special_cache", {})
        if token not in cache:
            cache[token] = self._own_special_id(token)
        return cache[token]

    def add_special_tokens(self, tokens: Sequence[str]) -> dict[str, int]:
        """Gives each token the tokenizer does not have the next free id; returns the new ones."""
        new = {}
        for token in tokens:
            if self.special_id(token) is None:
                new[token] = self.vocab_size
                self.added_tokens[token] = self.vocab_size
        return new

    def special_strings(self) -> list[str]:
        """Strings that name special tokens (a conversation containing one cannot be forged into
        the token by our templates, but an HF chat template would parse it)."""
        return list(self.added_tokens)

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

    def fingerprint(self) -> str:
        """sha256 of the tokenizer files and the added tokens."""
        h = hashlib.sha256()
        for path in self._files():
            h.update(os.path.basename(path).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(json.dumps(self.added_tokens, sort_keys=True).encode())
        return h.hexdigest()

    def save(self, directory: str) -> None:
        """Copies the tokenizer files and records the added tokens; `load_tokenizer(directory)`
        gives back the same tokenizer."""
        os.makedirs(directory, exist_ok=True)
        files = []
        for path in self._files():
            shutil.copy(path, os.path.join(directory, os.path.basename(path)))
            files.append(os.path.basename(path))
        meta = {"kind": self.kind, "files": files, "added_tokens": self.added_tokens,
                "source": self.path, "vocab_size": self.vocab_size,
                "base_vocab_size": self.base_vocab_size}
        if self.kind == "sentencepiece":
            meta["model"] = os.path.basename(self.path)
        with open(os.path.join(directory, SAVED), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)

    def describe(self) -> dict:
        return {"path": self.path, "kind": self.kind, "vocab_size": self.vocab_size,
                "base_vocab_size": self.base_vocab_size, "added_tokens": dict(self.added_tokens),
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"{path}: not a readable SentencePiece model ({_one_line(e)})") from None
        self.base_vocab_size = self._sp.get_piece_size()
        self.added_tokens = {}
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self._sp.eos_id() < 0:
            raise DataError(f"{path}: tokenizer has no EOS token")
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) < self.base_vocab_size])

    def _token_bytes(self, i: int) -> bytes | None:
        sp = self._sp
        if sp.is_control(i) or sp.is_unknown(i):
            return None
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def _piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def _own_special_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if i != self._sp.unk_id() and self._sp.id_to_piece(i) == token else None

    def _files(self) -> list[str]:
        return [self.path]


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = path
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad directory
            raise DataError(f"{path}: cannot load tokenizer ({_one_line(e)})") from None
        self._tok.model_max_length = 1 << 62  # conversations are split by us; no length warnings
        self.base_vocab_size = len(self._tok)
        self.added_tokens = {}
        self.bos_id = self._tok.bos_token_id
        if self._tok.eos_token_id is None:
            raise DataError(f"{path}: tokenizer has no EOS token")
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        self._fast = self._fast_encoder()

    @property
    def hf(self):
        """The transformers tokenizer (for its chat_template)."""
        return self._tok

    def _fast_encoder(self):
        """The `tokenizers` backend itself (transformers' encode has a per-call Python cost,
        and conversations are encoded a segment at a time), with special-token strings encoded as
        plain text; used only where it gives transformers' ids on a probe text."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer as Backend

        fast = Backend.from_str(backend.to_str())
        fast.encode_special_tokens = True
        probe = ("Hello world! </s> <s> <|im_end|> \n\n  indented\tcode é ☃ 日本 12345 "
                 + " ".join(t.content for t in self._tok.added_tokens_decoder.values()))
        slow = self._tok.encode(probe, add_special_tokens=False, split_special_tokens=True)
        return fast if fast.encode(probe, add_special_tokens=False).ids == slow else None

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        # split_special_tokens: a literal "</s>" in a conversation must not become the EOS id.
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) < self.base_vocab_size],
                                skip_special_tokens=True)

    def _token_bytes(self, i: int) -> bytes | None:
        if not hasattr(self, "_byte_table"):
            self._byte_table = byte_level_chars(self._tok)
            # What decode(skip_special_tokens=True) drops: the named ones and every added token
            # flagged special (LLaMA-3's <|eot_id|> is one, not always in all_special_ids).
            self._special_ids = set(self._tok.all_special_ids) | {
                int(i) for i, added in self._tok.added_tokens_decoder.items() if added.special}
        piece = self._tok.convert_ids_to_tokens(i)
        if i in self._special_ids or piece is None:
            return None
        table = self._byte_table
        if table is not None:  # GPT-2 style pieces; an added token not in its alphabet is as written
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def _piece(self, i: int) -> str:
        piece = self._tok.convert_ids_to_tokens(i)
        return piece if piece is not None else f"<{i}>"

    def _own_special_id(self, token: str) -> int | None:
        return next((int(i) for i, added in self._tok.added_tokens_decoder.items()
                     if added.content == token), None)

    def special_strings(self) -> list[str]:
        return [t.content for t in self._tok.added_tokens_decoder.values()] + list(self.added_tokens)

    def _files(self) -> list[str]:
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                 "chat_template.jinja", "chat_template.json")
        return [os.path.join(self.path, n) for n in names if os.path.isfile(os.path.join(self.path, n))]


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A SentencePiece `.model` file, or a directory holding `tokenizer.json`/`tokenizer.model`
    (or a copy written by `Tokenizer.save`, added special tokens included)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        saved = os.path.join(path, SAVED)
        if os.path.isfile(saved):
            return _load_saved(path, saved)
        if not any(os.path.isfile(os.path.join(path, f))
                   for f in ("tokenizer.json", "tokenizer.model")):
            raise DataError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")
        return HFTokenizer(path)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    raise DataError(f"{path}: no such tokenizer file or directory")


def _load_saved(directory: str, saved: str) -> Tokenizer:
    try:
        with open(saved, encoding="utf-8") as f:
            meta = json.load(f)
        tok: Tokenizer = (SentencePieceTokenizer(os.path.join(directory, meta["model"]))
                          if meta["kind"] == "sentencepiece" else HFTokenizer(directory))
        tok.added_tokens = {str(k): int(v) for k, v in meta["added_tokens"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{saved}: not a readable tokenizer record ({_one_line(e)})") from None
    expected = list(range(tok.base_vocab_size, tok.base_vocab_size + len(tok.added_tokens)))
    if sorted(tok.added_tokens.values()) != expected:
        raise DataError(f"{saved}: added token ids {sorted(tok.added_tokens.values())} do not "
                        f"follow the tokenizer's {tok.base_vocab_size} ids")
    return tok


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


def train_sentencepiece(texts: Iterable[str], out_prefix: str | os.PathLike[str],
                    vocab_size: int) -> str:
    """Trains a LLaMA-like SentencePiece BPE model; returns the path of `OUT_PREFIX.model`.

    Like LLaMA's: ids unk=0, bos=1, eos=2 (plus pad=3), byte fallback so any Unicode encodes,
    digits split, whitespace kept verbatim (code indentation survives). Single-threaded and
    unsampled, so the same texts always give the same model.
    """
    import sentencepiece as spm

    prefix = os.fspath(out_prefix)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=1 << 20, hard_vocab_limit=False,
        minloglevel=2)
    return prefix + ".model"


def byte_level_chars(hf) -> dict[str, int] | None:
    """For an HF tokenizer whose decoder is byte-level BPE (GPT-2 style pieces), the map from a
    piece's printable characters back to the bytes they stand for; None for any other tokenizer."""
    import json

    backend = getattr(hf, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    if "ByteLevel" not in json.dumps(decoder):
        return None
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, n = list(keep), 0
    for b in range(256):  # GPT-2's byte -> printable character table
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}
