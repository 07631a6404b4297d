"""`prepare`: input files -> cleaned, tokenized, split, packed rows of a prepared data set.

    read (main process: parse, validate, locate every record)
      -> clean + encode with the template + split long conversations (worker processes, in order)
      -> drop duplicates (main) -> eval split -> per-source weights -> pack -> ArrayRecord (tfds)

Everything is deterministic: the same inputs and settings give the same rows whatever the number
of workers (results are consumed in input order). The eval split takes the conversations whose
keyed hash ranks lowest (an exact count, independent of input order), and per-source weights
sample by keyed hash too; pieces of a split conversation stay in one split. Every record read is
accounted for: read = kept + dropped (by reason, "invalid" included), and stats.json lists them.

Records collected with `collect --top-logprobs K` carry the teacher's per-token log-probabilities
(data/teacher_logprobs.py); their top-K become sparse targets in the rows (data/teacher_targets.py)
where the teacher's tokens are the student tokenizer's own (exact) or, with another tokenizer, where
a student token's bytes are exactly one teacher token's (aligned); every other trained position of
such a set trains with cross entropy, and each fallback is counted in stats.json
(`teacher_logprobs`) and the summary.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Optional

import numpy as np

from imitation_jax.data import storage, teacher_logprobs
from imitation_jax.data.cleaning import CleaningConfig, clean, content_hash, normalized_phrases
from imitation_jax.data.examples import conversation_examples
from imitation_jax.data.formats import FORMATS, Conversation
from imitation_jax.errors import DataError
from imitation_jax.data.packing import PACKING, pack, packed_rows
from imitation_jax.data.readers import Source, check_readable, iter_parsed
from imitation_jax.data.stats import format_summary, length_histogram, query_diversity
from imitation_jax.data.teacher_targets import ALTERNATIVES, FALLBACKS, PieceBytes, example_targets
from imitation_jax.data.templates import TEMPLATE_NAMES, Example, get_template
from imitation_jax.data.tokenizer import Tokenizer, load_tokenizer

BATCH = 64  # conversations per task sent to a worker
MAX_INVALID_EXAMPLES = 20  # skipped-record messages kept in stats.json
AUTO_WORKERS_MIN_BYTES = 8 << 20  # below this much input, tokenizing in-process is faster


DEFAULT_TEMPLATE = "koala"
DEFAULT_SEQ_LEN = 512
DEFAULT_PACKING = "best_fit"
# stats.json and the cache keys record split_seed as "seed" (its name before data.seed, training's
# shuffle seed, shared the DataConfig); workers is not recorded (the rows do not depend on it).
_RECORDED_AS = {"split_seed": "seed"}
_NOT_RECORDED = ("workers",)


@dataclasses.dataclass
class PrepareSettings:
    """Every setting of `prepare` besides its inputs: the `data.*` keys that decide the rows.
    Declared once: `train`'s DataConfig extends this class and the `prepare` command's flags are
    aliases of these keys. `as_dict()` is what stats.json records and the training cache hashes."""

    tokenizer: Optional[str] = None  # SentencePiece .model, or a directory with tokenizer.model/tokenizer.json
    template: Optional[str] = None  # koala (default) | vicuna | llama2-chat | llama3 | chatml | qwen2.5 | gemma | hf
    seq_len: Optional[int] = None  # row length (default 512); with data.path: the set's
    packing: Optional[str] = None  # best_fit (default) | first_fit | none (one conversation per row)
    turn_tokens: bool = False  # add special tokens marking each user and model turn
    eval_fraction: float = 0.0  # of the kept training conversations, held out as the eval split
    skip_invalid: bool = False  # skip (and count) invalid records instead of stopping
    format: str = "auto"  # auto | sharegpt | openai | alpaca | text (inputs that do not say)
    split_seed: int = 0  # eval split and per-source sampling
    diversity_sample: int = 256  # user queries for the diversity figure in stats (0: skip it)
    cleaning: CleaningConfig = dataclasses.field(default_factory=CleaningConfig)
    workers: Optional[int] = None  # tokenizing processes (None: all cores; in-process for small inputs)

    def validate(self) -> None:
        """Checks of the values alone (no file is read); DataError names the key."""
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise DataError(f"data.template: unknown chat template {self.template!r}; known: "
                            f"{', '.join(TEMPLATE_NAMES)}", "bad_option")
        if self.seq_len is not None and self.seq_len < 2:
            raise DataError(f"data.seq_len must be at least 2, got {self.seq_len}", "bad_option")
        if self.packing is not None and self.packing not in PACKING:
            raise DataError(f"data.packing={self.packing!r} is not one of {', '.join(PACKING)}",
                            "bad_option")
        if not 0 <= self.eval_fraction < 1:
            raise DataError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)",
                            "bad_option")
        if self.format not in ("auto", *FORMATS):
            raise DataError(f"data.format={self.format!r} is not one of auto, "
                            f"{', '.join(FORMATS)}", "bad_option")
        if not 0 <= self.split_seed < 2**64:
            raise DataError(f"data.split_seed={self.split_seed} must be in [0, 2**64)", "bad_option")
        if self.diversity_sample < 0:
            raise DataError(f"data.diversity_sample={self.diversity_sample} must be >= 0",
                            "bad_option")

    def prepare_settings(self) -> PrepareSettings:
        """Just these settings (of a DataConfig too), unset ones given their defaults."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(PrepareSettings)}
        cleaning = values["cleaning"]
        values["cleaning"] = CleaningConfig(**(dataclasses.asdict(cleaning)
                                               if dataclasses.is_dataclass(cleaning) else cleaning))
        for name, default in (("template", DEFAULT_TEMPLATE), ("seq_len", DEFAULT_SEQ_LEN),
                              ("packing", DEFAULT_PACKING)):
            if values[name] is None:
                values[name] = default
        return PrepareSettings(**values)

    def as_dict(self) -> dict:
        """The settings that decide the rows, defaults filled in (stats.json's `settings`)."""
        resolved = self.prepare_settings()
        recorded = {}
        for f in dataclasses.fields(PrepareSettings):
            if f.name not in _NOT_RECORDED:
                value = getattr(resolved, f.name)
                recorded[_RECORDED_AS.get(f.name, f.name)] = (
                    dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        return recorded

    @staticmethod
    def recorded_name(name: str) -> str:
        """The key under which stats.json's `settings` records the setting `name`."""
        return _RECORDED_AS.get(name, name)


# ---------------------------------------------------------------- workers


@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
    tokenizer: str
    added: tuple[str, ...]
    template: str
    turn_tokens: bool
    seq_len: int
    cleaning: CleaningConfig


class _Worker:
    """Cleans and encodes batches of conversations (in a worker process, or inline)."""

    def __init__(self, spec: _WorkerSpec, tokenizer: Tokenizer | None = None):
        if tokenizer is None:
            tokenizer = load_tokenizer(spec.tokenizer)
            tokenizer.add_special_tokens(spec.added)
        self.tokenizer = tokenizer
        self.template = get_template(spec.template, tokenizer, turn_tokens=spec.turn_tokens)
        self.spec = spec
        self.phrases = normalized_phrases(spec.cleaning)
        self._pieces: PieceBytes | None = None  # built on the first record with teacher logprobs

    def __call__(self, batch: list[tuple[Conversation, tuple | None]]) -> list[tuple]:
        out = []
        cfg = self.spec.cleaning
        for conv, raw in batch:
            teacher = None
            if raw is not None:  # parsed here, in the worker: the records are large
                try:
                    teacher = teacher_logprobs.parse({"messages": raw[1]}, raw[0]) or None
                except DataError as e:
                    out.append((_INVALID, Counter(), str(e), e.kind))
                    continue
            cleaned, counts = clean(conv, cfg, self.phrases)
            if isinstance(cleaned, str):
                out.append((cleaned, counts))
                continue
            turns: list = []
            examples, more, reason = conversation_examples(
                cleaned, self.tokenizer, self.template, self.spec.seq_len, cfg.split_long,
                cfg.truncate_long_turns, turns)
            counts.update(more)
            if reason is not None:
                out.append((reason, counts))
                continue
            targets = [None] * len(examples)
            if teacher:
                if self._pieces is None:
                    self._pieces = PieceBytes(self.tokenizer)
                counts["teacher_records"] += 1
                answers = _cleaned_answers(conv, teacher, cleaned, counts)
                targets = [example_targets(e.ids, e.loss_mask, [answers.get(i) for i in held],
                                           cut, self._pieces, _Prefixed(counts))
                           for e, (held, cut) in zip(examples, turns)]
            query = next((m.content for m in cleaned.messages if m.role == "user"), None)
            out.append((None, counts, content_hash(cleaned),
                        [(e.ids, e.loss_mask, t) for e, t in zip(examples, targets)], query,
                        max((t.k for t in teacher.values()), default=0) if teacher else 0))
        return out


class _Prefixed:
    """A view of a Counter whose keys get the prefix "teacher_" (the worker's counts carry them)."""

    def __init__(self, counts: Counter):
        self.counts = counts

    def __getitem__(self, key: str) -> int:
        return self.counts["teacher_" + key]

    def __setitem__(self, key: str, value: int) -> None:
        self.counts["teacher_" + key] = value


def _cleaned_answers(conv: Conversation, teacher: dict, cleaned: Conversation, counts: Counter
                     ) -> dict[int, teacher_logprobs.TeacherLogprobs]:
    """The teacher records by index in the cleaned conversation: each recorded answer maps to the
    next cleaned assistant message with exactly its text; one that cleaning changed or dropped
    is counted (changed_by_cleaning) and trains with cross entropy."""
    out = {}
    j = 0
    messages = cleaned.messages
    for i in sorted(teacher):
        content = conv.messages[i].content
        k = next((k for k in range(j, len(messages))
                  if messages[k].role == "assistant" and messages[k].content == content), None)
        if k is None:
            counts["teacher_answers"] += 1
            counts["teacher_answers_fallback_changed_by_cleaning"] += 1
            counts["teacher_positions_fallback_changed_by_cleaning"] += len(teacher[i].tokens)
            continue
        out[k] = teacher[i]
        j = k + 1
    return out


_INVALID = "\0invalid"  # a worker's result for a record it found invalid: (_INVALID, {}, message, kind)
_worker: _Worker | None = None


def _init_worker(spec: _WorkerSpec) -> None:
    global _worker
    _worker = _Worker(spec)


def _work(batch: list[Conversation]) -> list[tuple]:
    assert _worker is not None
    return _worker(batch)


# ---------------------------------------------------------------- collecting


@dataclasses.dataclass
class _Kept:
    source: int
    split: str
    key: bytes  # content hash
    examples: list[tuple]  # (ids, loss_mask, sparse teacher targets or None)
    teacher_k: int = 0  # the K of its teacher records (0: none)


class _Collector:
    def __init__(self, settings: PrepareSettings, n_sources: int):
        self.settings = settings
        self.kept: list[_Kept] = []
        self.seen: set[bytes] = set()
        self.dropped: Counter = Counter()
        self.invalid: Counter = Counter()
        self.invalid_examples: list[str] = []
        self.turns: Counter = Counter()
        self.sources = [Counter() for _ in range(n_sources)]
        self.queries: list[tuple[bytes, str]] = []  # heap of (-rank key, query) for diversity
        self.read = 0
        self.tokens = 0
        self.formats: dict[str, str] = {}  # path -> format detected
        self.teacher: Counter = Counter()  # kept conversations' teacher-logprob tallies

    def invalid_record(self, source: int, error: DataError) -> None:
        if not self.settings.skip_invalid:
            raise error
        self.read += 1
        self.sources[source]["read"] += 1
        self.sources[source]["invalid"] += 1
        self.invalid[error.kind] += 1
        self.dropped["invalid"] += 1
        if len(self.invalid_examples) < MAX_INVALID_EXAMPLES:
            self.invalid_examples.append(str(error))

    def results(self, source: int, split: str, results: list[tuple]) -> None:
        for result in results:
            if result[0] == _INVALID:
                self.invalid_record(source, DataError(result[2], result[3]))
                continue
            self.read += 1
            self.sources[source]["read"] += 1
            reason, counts = result[0], result[1]
            teacher = Counter({k[len("teacher_"):]: counts.pop(k) for k in list(counts)
                               if k.startswith("teacher_")})
            if reason is not None:
                counts.pop("turns_kept", None)
                self.turns.update(counts)
                self.dropped[reason] += 1
                continue
            key, examples, query = result[2], result[3], result[4]
            if self.settings.cleaning.dedup:
                if key in self.seen:
                    self.turns["turns_read"] += counts["turns_read"]
                    self.dropped["duplicate"] += 1
                    continue
                self.seen.add(key)
            self.turns.update(counts)
            self.teacher.update(teacher)
            self.sources[source]["kept"] += 1
            self.kept.append(_Kept(source, split, key, examples, result[5]))
            self.tokens += sum(len(e[0]) for e in examples)
            if split == "train" and query and self.settings.diversity_sample:
                rank = _rank(self.settings.split_seed, b"diversity", key)
                item = (_negate(rank), query[:2000])
                if len(self.queries) < self.settings.diversity_sample:
                    heapq.heappush(self.queries, item)
                elif item > self.queries[0]:
                    heapq.heapreplace(self.queries, item)


def _rank(seed: int, salt: bytes, key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=8, key=seed.to_bytes(8, "little") + salt[:8]).digest()


def _negate(rank: bytes) -> bytes:
    return bytes(255 - b for b in rank)


def _conversations(source: Source, progress, detected: dict[str, str]
                   ) -> Iterator[tuple[Conversation, tuple | None] | DataError]:
    """readers.iter_conversations, each conversation with ("FILE:LINE", its record's messages)
    when one of them carries teacher logprobs (None otherwise): the workers parse those."""
    for item in iter_parsed(source, progress, detected):
        if isinstance(item, DataError):
            yield item
            continue
        conv, where, fmt, record = item
        messages = record.get("messages") if fmt == "openai" else None
        teacher = None
        if isinstance(messages, list) and any(isinstance(m, dict) and teacher_logprobs.FIELD in m
                                              for m in messages):
            teacher = (where, messages)
        yield conv, teacher


def _batches(sources: list[tuple[int, str, Source]], collector: _Collector, progress
             ) -> Iterator[tuple[int, str, list[tuple[Conversation, tuple | None]]]]:
    for index, split, source in sources:
        batch: list[tuple[Conversation, tuple | None]] = []
        for item in _conversations(source, progress, collector.formats):
            if isinstance(item, DataError):
                collector.invalid_record(index, item)
                continue
            batch.append(item)
            if len(batch) == BATCH:
                yield index, split, batch
                batch = []
        if batch:
            yield index, split, batch


def auto_workers(sources: Sequence[Source]) -> int:
    size = sum(os.path.getsize(s.path) for s in sources)
    return 1 if size < AUTO_WORKERS_MIN_BYTES else max(1, min(os.cpu_count() or 1, 32))


def _collect(spec: _WorkerSpec, tokenizer: Tokenizer, sources: list[tuple[int, str, Source]],
             collector: _Collector, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    total = None if any(s.path.endswith(".gz") for _, _, s in sources) else \
        sum(os.path.getsize(s.path) for _, _, s in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", leave=False,
               disable=None if progress else True)

    def handle(index: int, split: str, results: list[tuple]) -> None:
        collector.results(index, split, results)
        bar.set_postfix(read=collector.read, kept=len(collector.kept), refresh=False)

    try:
        batches = _batches(sources, collector, bar.update)
        if workers <= 1:
            worker = _Worker(spec, tokenizer)
            for index, split, batch in batches:
                handle(index, split, worker(batch))
            return
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may run JAX
        with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
            pending: collections.deque = collections.deque()
            for index, split, batch in batches:
                pending.append((index, split, pool.apply_async(_work, (batch,))))
                while len(pending) > 4 * workers:
                    index, split, job = pending.popleft()
                    handle(index, split, job.get())
            while pending:
                index, split, job = pending.popleft()
                handle(index, split, job.get())
    finally:
        bar.close()


# ---------------------------------------------------------------- splitting and sampling


def _select(convs: list[_Kept], count: int, seed: int, salt: bytes) -> list[_Kept]:
    """`count` conversations: whole copies in input order, then a keyed-hash-ranked subset."""
    if not convs or count <= 0:
        return []
    copies, rest = divmod(count, len(convs))
    ranked = sorted(range(len(convs)), key=lambda i: _rank(seed, salt, convs[i].key))
    chosen = set(ranked[:rest])
    return convs * copies + [c for i, c in enumerate(convs) if i in chosen]


def _split_and_sample(collector: _Collector, settings: PrepareSettings,
                      sources: list[tuple[int, str, Source]]) -> dict[str, list[_Kept]]:
    train = [k for k in collector.kept if k.split == "train"]
    evals = [k for k in collector.kept if k.split == "eval"]
    if settings.eval_fraction > 0 and len(train) >= 2:
        n_eval = min(len(train) - 1, max(1, round(settings.eval_fraction * len(train))))
        ranked = sorted(range(len(train)), key=lambda i: _rank(settings.split_seed, b"eval", train[i].key))
        held = set(ranked[:n_eval])
        for i in held:
            collector.sources[train[i].source]["moved_to_eval"] += 1
        evals += [k for i, k in enumerate(train) if i in held]
        train = [k for i, k in enumerate(train) if i not in held]
    selected: list[_Kept] = []
    for index, split, source in sources:
        if split != "train":
            continue
        mine = [k for k in train if k.source == index]
        if source.count is not None:
            count = source.count
        elif source.weight is not None:
            count = round(source.weight * len(mine))
        else:
            count = len(mine)
        picked = _select(mine, count, settings.split_seed, b"w%d" % index)
        collector.sources[index]["used"] = len(picked)
        selected += picked
    return {"train": selected, "eval": evals}


# ---------------------------------------------------------------- the whole step


def _as_source(spec: str | Source, default_format: str) -> Source:
    return spec if isinstance(spec, Source) else Source.parse(spec, default_format)


def input_fingerprint(source: Source) -> dict:
    st = os.stat(source.path)
    return {"path": os.path.abspath(source.path), "format": source.format, "weight": source.weight,
            "count": source.count, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare(inputs: Sequence[str | Source], out: str, settings: PrepareSettings, *,
            eval_inputs: Sequence[str | Source] = (), workers: int | None = None,
            progress: bool = True, extra: dict | None = None) -> dict:
    """Prepares `inputs` (training) and `eval_inputs` into the directory `out`; returns stats.

    `settings`: a PrepareSettings (or a DataConfig: its prepare settings are used).
    `workers`: tokenizing processes (default settings.workers; None: all cores, or in-process
    for small inputs). `extra`: more fields for stats.json (the training cache stores its key).
    Raises DataError for bad input (the first invalid record unless settings.skip_invalid).
    """
    start = time.perf_counter()
    if workers is None:
        workers = settings.workers
    settings = settings.prepare_settings()
    settings.validate()
    if not settings.tokenizer:
        raise DataError("no tokenizer: set data.tokenizer (prepare --tokenizer)", "bad_option")
    train_sources = [_as_source(x, settings.format) for x in inputs]
    eval_sources = [_as_source(x, settings.format) for x in eval_inputs]
    if not train_sources:
        raise DataError("no input files given", "bad_option")
    for s in train_sources + eval_sources:
        check_readable(s.path)
    out = os.path.abspath(out)
    storage.check_output(out)
    tokenizer = load_tokenizer(settings.tokenizer)
    source_fingerprint = tokenizer.fingerprint()
    template = get_template(settings.template, tokenizer, turn_tokens=settings.turn_tokens)
    if hasattr(template, "require_markers"):  # a chat_template must mark the replies to build masks from
        template.require_markers()
    added = tokenizer.add_special_tokens(template.special_tokens)
    spec = _WorkerSpec(settings.tokenizer, tuple(added), settings.template, settings.turn_tokens,
                       settings.seq_len, settings.cleaning)
    # Eval inputs first: a training conversation that duplicates an eval one is dropped.
    sources = [(i, "eval", s) for i, s in enumerate(eval_sources)] + \
        [(len(eval_sources) + i, "train", s) for i, s in enumerate(train_sources)]
    if workers is None:
        workers = auto_workers([s for _, _, s in sources])
    collector = _Collector(settings, len(sources))
    _collect(spec, tokenizer, sources, collector, workers, progress)
    splits = _split_and_sample(collector, settings, sources)
    read_seconds = time.perf_counter() - start

    # Only a set whose kept conversations carry teacher logprobs stores sparse targets.
    teacher_k = max((k.teacher_k for k in collector.kept), default=0)
    with storage.staged(out) as tmp:
        split_stats, per_row, rows_by_split = {}, {}, {}
        for name in storage.SPLITS:
            kept = splits[name]
            examples = [Example(e[0], e[1]) for k in kept for e in k.examples]
            teachers = [e[2] for k in kept for e in k.examples] if teacher_k else None
            lengths = np.asarray([len(e) - 1 for e in examples], np.int64)
            trained = np.asarray([int(e.loss_mask[1:].sum()) for e in examples], np.int64)
            assignment = pack(lengths, settings.seq_len, settings.packing)
            if assignment:  # rows are made as tfds writes them (tfds refuses an empty split)
                rows_by_split[name] = packed_rows(examples, assignment, teachers, teacher_k)
            per_row[name] = {"trained": np.asarray([trained[r].sum() for r in assignment], np.int64),
                             "tokens": np.asarray([lengths[r].sum() for r in assignment], np.int64),
                             "examples": np.asarray([len(r) for r in assignment], np.int64)}
            split_stats[name] = {
                "conversations": len({id(k) for k in kept}), "examples": len(examples),
                "rows": len(assignment), "tokens": int(lengths.sum()),
                "trained_tokens": int(trained.sum()),
                "non_pad_fraction": float(lengths.sum() / max(1, len(assignment) * settings.seq_len)),
                "padded_rows": len(examples),
                "padded_non_pad_fraction": float(lengths.sum() / max(1, len(examples) * settings.seq_len)),
                "length_histogram": length_histogram(lengths, settings.seq_len),
            }
        split_stats["train"]["repeated_conversations"] = len(splits["train"]) - len(
            {id(k) for k in splits["train"]})
        if split_stats["train"]["rows"] == 0:
            raise DataError(f"no training rows: all {collector.read} conversations read were "
                            f"dropped ({dict(collector.dropped)})", "no_data")
        content = {name: hashlib.sha256() for name in rows_by_split}  # the fingerprint covers the rows
        storage.write_rows(tmp, {name: _hashed(rows, content[name]) for name, rows in rows_by_split.items()},
                           teacher_k)
        storage.write_index(tmp, per_row)
        storage.save_tokenizer(tmp, tokenizer)

        queries = [q for _, q in sorted(collector.queries, reverse=True)]
        diversity = query_diversity(queries) if len(queries) >= 2 else None
        seconds = time.perf_counter() - start
        fp = hashlib.sha256(json.dumps(settings.as_dict(), sort_keys=True).encode())
        fp.update(tokenizer.fingerprint().encode())
        for name in storage.SPLITS:
            fp.update(per_row[name]["trained"].tobytes() + per_row[name]["tokens"].tobytes())
            if name in content:
                fp.update(content[name].digest())
        source_stats = []
        for index_, split, s in sources:
            c = collector.sources[index_]
            fmt = s.format if s.format != "auto" else collector.formats.get(s.path, "auto")
            entry = {"path": s.path, "split": split, "format": fmt, "read": c["read"],
                     "invalid": c["invalid"], "kept": c["kept"]}
            if split == "train":
                entry["moved_to_eval"] = c["moved_to_eval"]
                entry["used"] = c["used"]
                if s.weight is not None or s.count is not None:
                    entry["selection"] = (f"weight {s.weight:g}" if s.weight is not None
                                          else f"count {s.count}")
            source_stats.append(entry)
        return storage.write_stats(tmp, {
            "path": out,
            "fingerprint": fp.hexdigest()[:16],
            "template": getattr(template, "name", settings.template),
            "settings": settings.as_dict(),
            "inputs": source_stats,
            "input_files": [{"split": split, **input_fingerprint(s)} for _, split, s in sources],
            "tokenizer": {**tokenizer.describe(), "fingerprint": tokenizer.fingerprint(),
                          "source_fingerprint": source_fingerprint},
            "conversations": {"read": collector.read, "kept": len(collector.kept),
                              "dropped": dict(collector.dropped), "invalid": dict(collector.invalid),
                              "invalid_examples": collector.invalid_examples},
            "turns": dict(collector.turns),
            "splits": split_stats,
            "diversity": {"mean_max_bleu": diversity, "sample": len(queries)},
            **({storage.TEACHER_STATS: _teacher_stats(collector.teacher, teacher_k)} if teacher_k else {}),
            "timing": {"seconds": seconds, "read_and_tokenize_seconds": read_seconds,
                       "workers": workers,
                       "conversations_per_s": collector.read / max(seconds, 1e-9),
                       "tokens_per_s": collector.tokens / max(seconds, 1e-9)},
            **(extra or {}),
        })


def _teacher_stats(counts: Counter, k: int) -> dict:
    """stats.json's `teacher_logprobs`: K, and how the kept conversations' recorded answers and
    their positions were used (exact sparse targets, targets aligned by byte offsets from another
    tokenizer, or cross entropy by fallback reason), and how many alternatives at aligned positions
    were folded into the tail or merged. Positions are the student's tokens of an answer, except
    for an answer that falls back whole (tokenization_mismatch, changed_by_cleaning, unaligned,
    truncated): the teacher's. Counted per kept conversation read (not per use in the rows)."""
    def by_reason(prefix: str) -> dict:
        return {r: counts[f"{prefix}_fallback_{r}"] for r in FALLBACKS if counts[f"{prefix}_fallback_{r}"]}

    return {"k": k, "records": counts["records"],
            "answers": {"total": counts["answers"], "exact": counts["answers_exact"],
                        "aligned": counts["answers_aligned"], "partial": counts["answers_partial"],
                        "fallback": by_reason("answers")},
            "positions": {"exact": counts["positions_exact"], "aligned": counts["positions_aligned"],
                          "end_of_turn": counts["positions_end_of_turn"], "fallback": by_reason("positions")},
            "alternatives": {a: counts["alternatives_" + a] for a in ALTERNATIVES}}


def _hashed(rows, hasher):
    """`rows` passed through unchanged, each one's ids, mask and example lengths (and sparse
    teacher targets) added to `hasher`."""
    for row in rows:
        tokens, mask, lengths = row[:3]
        hasher.update(np.asarray(tokens, np.int32).tobytes())
        hasher.update(np.packbits(np.asarray(mask, bool)).tobytes())
        hasher.update(np.asarray(lengths, np.int32).tobytes())
        for part in row[3] if len(row) > 3 else ():
            hasher.update(np.ascontiguousarray(part).tobytes())
        yield row


def summary(stats: dict) -> str:
    return format_summary(stats)
