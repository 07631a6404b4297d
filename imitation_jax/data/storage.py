"""Prepared data sets on disk, both ways: `prepare` writes through this module and training
reads through it. Packed rows live in ArrayRecord files written by a tensorflow-datasets builder
(TensorFlow is never imported: tfds writes and reads `array_record` without it).

Layout of a prepared set DIR:

    DIR/stats.json                  format version, settings, inputs, counts, drops, tokens, ...
    DIR/index.npz                   per split and row: trained tokens, non-pad tokens, examples
    DIR/tokenizer/                  the tokenizer used, plus any special tokens added to it
    DIR/imitation_rows/1.0.0/       the tfds data set: dataset_info.json, features.json and
                                    imitation_rows-{train,eval}.array_record-NNNNN-of-NNNNN

Each record is one packed row: {"index": row number, "tokens": int32 ids of its examples
concatenated, "loss_mask": uint8, "lengths": int32 ids per example}. A set prepared from records
with the teacher's log-probabilities (stats.json `teacher_logprobs.k` = K) adds the row's sparse
targets: "teacher_positions" int32 [P] (indices into tokens), "teacher_ids" int32 [P, K] (-1: a
padded slot) and "teacher_logprobs" float32 [P, K]; other sets' records are as before. The builder has shuffling
disabled, so record i of a split is row i (tfds otherwise orders records by a hash of their key;
without shuffling it sorts a split's records by key in memory, which prepare's own copy of the
examples already needs room for); every read still checks that the record found is the row asked
for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np

from imitation_jax.errors import DataError
from imitation_jax.data.packing import PackedRow, PackStats, assemble

BUILDER = "imitation_rows"
VERSION = "1.0.0"
SPLITS = ("train", "eval")
INDEX = "index.npz"
INDEX_FIELDS = ("trained", "tokens", "examples")  # per row: trained tokens, non-pad tokens, examples
STATS = "stats.json"
TOKENIZER_DIR = "tokenizer"
# Bump when the files change, or prepare's rows change for the same inputs and settings.
# 2: records written in row order (no `order` array in index.npz).
# 3: sets from records with teacher logprobs store sparse targets (teacher_* features).
FORMAT_VERSION = 3
TEACHER_STATS = "teacher_logprobs"  # stats.json key of such a set: {"k": K, counts...}

_builder_class = None


def _builder():
    """The tfds builder class (defined on first use, so importing this module stays cheap)."""
    global _builder_class
    if _builder_class is not None:
        return _builder_class
    import tensorflow_datasets as tfds

    class ImitationRows(tfds.core.GeneratorBasedBuilder):
        """Packed, masked rows of an imitation data set (see imitation_jax.data.storage)."""

        VERSION = tfds.core.Version(VERSION)
        code_path = None  # no checksums file to look for (and no importlib_resources needed)

        def __init__(self, *, splits: dict[str, Iterable[PackedRow]] | None = None,
                     teacher_k: int = 0, **kwargs):
            self._rows = splits or {}
            self._teacher_k = teacher_k
            super().__init__(**kwargs)

        def _info(self):
            features = {
                "index": tfds.features.Scalar(np.int64),
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                "lengths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            }
            k = self._teacher_k
            if k:
                features.update({
                    "teacher_positions": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "teacher_ids": tfds.features.Tensor(shape=(None, k), dtype=np.int32),
                    "teacher_logprobs": tfds.features.Tensor(shape=(None, k), dtype=np.float32)})
            return tfds.core.DatasetInfo(
                builder=self, description="Packed imitation rows (imitation_jax prepare)",
                features=tfds.features.FeaturesDict(features),
                disable_shuffling=True)  # records in key order: record i is row i

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(rows) for name, rows in self._rows.items()}

        def _generate_examples(self, rows):
            for i, row in enumerate(rows):
                tokens, mask, lengths = row[:3]
                record = {"index": i, "tokens": tokens, "loss_mask": mask.astype(np.uint8),
                          "lengths": lengths}
                if self._teacher_k:
                    record["teacher_positions"], record["teacher_ids"], record["teacher_logprobs"] = row[3]
                yield i, record

        def _log_download_bytes(self):  # tfds prints these to stdout; prepare prints a summary
            pass

        def _log_download_done(self):
            pass

    ImitationRows.name = BUILDER
    _builder_class = ImitationRows
    return ImitationRows


# ---------------------------------------------------------------- writing


def check_output(out: str) -> None:
    """`out` may be written: absent, empty, or a prepared set (which is replaced)."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise DataError(f"{out}: exists and is not a directory", "bad_output")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, STATS)):
            raise DataError(f"{out}: exists and is not a prepared data set (no {STATS}); "
                            "choose another --out or remove it", "bad_output")


@contextlib.contextmanager
def staged(out: str) -> Iterator[str]:
    """A new directory beside `out` to write a set into; when the block ends without an error it
    replaces `out` (a previous set is removed only afterwards), otherwise it is removed."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_rows(directory: str, splits: dict[str, Iterable[PackedRow]], teacher_k: int = 0) -> str:
    """Writes each split's rows, record i = row i, with the tfds builder; returns the tfds data
    set directory. tfds refuses an empty split: leave it out (it reads back as 0 rows).
    teacher_k > 0: rows carry sparse teacher targets of K slots (a 4th item)."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    builder = _builder()(splits=splits, teacher_k=teacher_k, data_dir=directory,
                         file_format="array_record")
    builder.download_and_prepare()
    shutil.rmtree(os.path.join(directory, "downloads"), ignore_errors=True)
    return os.fspath(builder.data_path)


def write_index(directory: str, per_row: dict[str, dict[str, np.ndarray]]) -> None:
    """index.npz from {split: {field: one value per row}} for every split and INDEX_FIELDS."""
    np.savez(os.path.join(directory, INDEX), **{
        f"{split}_{field}": np.asarray(per_row[split][field], np.int64)
        for split in SPLITS for field in INDEX_FIELDS})


def save_tokenizer(directory: str, tokenizer) -> None:
    tokenizer.save(os.path.join(directory, TOKENIZER_DIR))


def write_stats(directory: str, stats: dict) -> dict:
    """stats.json, with the format version first; returns what was written."""
    stats = {"version": FORMAT_VERSION, **stats}
    with open(os.path.join(directory, STATS), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    return stats


# ---------------------------------------------------------------- reading


def read_stats(directory: str) -> dict | None:
    """DIR/stats.json, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(directory, STATS), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def dataset_dir(directory: str) -> str:
    return os.path.join(directory, BUILDER, VERSION)


def open_source(directory: str, split: str):
    """The tfds ArrayRecord data source of one split (random access, decoded records)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder_from_directory(dataset_dir(directory)).as_data_source(split=split)
    except Exception as e:  # tfds raises several types for a missing or damaged directory
        raise DataError(f"{directory}: cannot open the {split} split of the prepared rows "
                        f"({' '.join(str(e).split())[:200]})", "bad_prepared_set") from None


class PreparedSplit:
    """One split of a prepared set as a random-access row source (the loader's interface)."""

    def __init__(self, directory: str, split: str, seq_len: int, pad_id: int, fingerprint: str,
                 teacher_k: int = 0):
        self.directory, self.split = directory, split
        self.seq_len, self.pad_id = seq_len, pad_id
        self.teacher_k = teacher_k  # > 0: batches carry teacher_ids / teacher_logprobs (B, T, K)
        self.fingerprint = f"{fingerprint}:{split}"
        try:
            with np.load(os.path.join(directory, INDEX)) as index:
                self.trained_per_row = index[f"{split}_trained"]
                self.tokens_per_row = index[f"{split}_tokens"]
                self.examples_per_row = index[f"{split}_examples"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{directory}: unreadable {INDEX} ({e})", "bad_prepared_set") from None
        self.stats = PackStats(examples=int(self.examples_per_row.sum()), rows=len(self.trained_per_row),
                               truncated=0, dropped=0, trained_tokens=int(self.trained_per_row.sum()),
                               tokens=int(self.tokens_per_row.sum()), seq_len=seq_len)
        self._source = None

    def __len__(self) -> int:
        return len(self.trained_per_row)

    def __getstate__(self):  # picklable: the ArrayRecord readers are reopened on demand
        return {**self.__dict__, "_source": None}

    @property
    def source(self):
        if self._source is None:
            source = open_source(self.directory, self.split)
            if len(source) != len(self):
                raise DataError(f"{self.directory}: the {self.split} split has {len(source)} "
                                f"records but {INDEX} lists {len(self)} rows", "bad_prepared_set")
            self._source = source
        return self._source

    def rows(self, indices: Iterable[int]) -> list[PackedRow | None]:
        """Compact rows; index -1 gives None (a padding row)."""
        indices = [int(i) for i in indices]
        wanted = [i for i in indices if i >= 0]
        records = self.source.__getitems__(wanted) if wanted else []
        by_index: dict[int, PackedRow] = {}
        for i, rec in zip(wanted, records):
            if int(rec["index"]) != i:
                raise DataError(f"{self.directory}: {self.split} record {i} holds row "
                                f"{int(rec['index'])}: the ArrayRecord files are not in row order",
                                "bad_prepared_set")
            by_index[i] = (rec["tokens"], rec["loss_mask"].astype(np.bool_), rec["lengths"])
            if self.teacher_k:
                by_index[i] += ((rec["teacher_positions"], rec["teacher_ids"], rec["teacher_logprobs"]),)
        return [by_index[i] if i >= 0 else None for i in indices]

    def take(self, indices) -> dict[str, np.ndarray]:
        return assemble(self.rows(np.asarray(indices).tolist()), self.seq_len, self.pad_id,
                        self.teacher_k)

    def __iter__(self) -> Iterator[PackedRow]:
        for start in range(0, len(self), 256):
            yield from self.rows(range(start, min(len(self), start + 256)))  # type: ignore[misc]


class PreparedSet:
    """A prepared data set directory: its stats, tokenizer, template and splits."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        path = os.path.join(self.directory, STATS)
        if not os.path.isfile(path):
            raise DataError(f"{directory}: not a prepared data set (no {STATS}); make one with "
                            "`imitation-jax prepare INPUT... --out DIR`", "bad_prepared_set")
        try:
            with open(path, encoding="utf-8") as f:
                self.stats = json.load(f)
            version = self.stats.get("version")
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"{path}: unreadable ({' '.join(str(e).split())[:200]})",
                            "bad_prepared_set") from None
        if version != FORMAT_VERSION:
            raise DataError(f"{directory}: prepared by format version {version}, this code reads "
                            f"version {FORMAT_VERSION}: prepare it again", "bad_prepared_set")
        try:
            self.settings = self.stats["settings"]
            self.seq_len = int(self.settings["seq_len"])
            self.pad_id = int(self.stats["tokenizer"]["pad_id"])
            self.fingerprint = str(self.stats["fingerprint"])
            self.teacher_k = int((self.stats.get(TEACHER_STATS) or {}).get("k", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: unreadable ({' '.join(str(e).split())[:200]})",
                            "bad_prepared_set") from None
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The tokenizer saved with the set (special tokens added by prepare included)."""
        if self._tokenizer is None:
            from imitation_jax.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(os.path.join(self.directory, TOKENIZER_DIR))
        return self._tokenizer

    @property
    def template(self):
        """The chat template the set was rendered with (for prompts at inference)."""
        from imitation_jax.data.templates import get_template

        return get_template(self.settings["template"], self.tokenizer,
                            turn_tokens=bool(self.settings.get("turn_tokens")))

    def rows(self, split: str) -> int:
        return int(self.stats["splits"][split]["rows"])

    def split(self, split: str) -> PreparedSplit:
        return PreparedSplit(self.directory, split, self.seq_len, self.pad_id, self.fingerprint,
                             self.teacher_k)
