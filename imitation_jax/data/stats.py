"""Figures about a prepared set: length histogram, query diversity, and the printed summary."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def length_histogram(lengths: Sequence[int] | np.ndarray, seq_len: int) -> list[dict]:
    """Examples per length bucket (row positions): [0, 32), [32, 64), ... doubling to seq_len."""
    lengths = np.asarray(lengths, np.int64)
    edges = [0]
    while edges[-1] < seq_len:
        edges.append(min(seq_len, 32 if edges[-1] == 0 else edges[-1] * 2))
    edges[-1] = seq_len + 1  # the last bucket includes seq_len itself
    counts, _ = np.histogram(lengths, bins=edges)
    return [{"min": int(a), "max": int(min(b - 1, seq_len)), "examples": int(c)}
            for a, b, c in zip(edges, edges[1:], counts)]


def query_diversity(queries: Sequence[str]) -> float | None:
    """The reference study's diversity figure: the mean, over queries, of the sentence BLEU
    (sacrebleu, 13a tokens, exp smoothing, effective order; 0-100) to the most similar *other*
    query. Lower is more diverse. O(n^2) pairs, so give it a bounded sample."""
    if len(queries) < 2:
        return None
    from sacrebleu.metrics import BLEU
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    bleu = BLEU(effective_order=True)
    grams = [extract_all_word_ngrams(bleu.tokenizer(q.strip()), 1, bleu.max_ngram_order)
             for q in queries]
    unigrams = [{g for g in counts if len(g) == 1} for counts, _ in grams]
    best = []
    for i, (hyp, hyp_len) in enumerate(grams):
        top = 0.0
        for j, (ref, ref_len) in enumerate(grams):
            if i == j or hyp_len == 0 or not unigrams[i] & unigrams[j]:
                continue  # no shared word: BLEU 0
            correct = [0] * bleu.max_ngram_order
            total = [0] * bleu.max_ngram_order
            for gram, count in hyp.items():
                n = len(gram) - 1
                total[n] += count
                if gram in ref:
                    correct[n] += min(count, ref[gram])
            score = BLEU.compute_bleu(correct, total, hyp_len, ref_len, smooth_method="exp",
                                      effective_order=True).score
            top = max(top, score)
        best.append(top)
    return float(np.mean(best))


def _n(x: float) -> str:
    return f"{x:,.0f}" if isinstance(x, int) or float(x).is_integer() else f"{x:,.2f}"


def _reasons(counts: dict) -> str:
    items = [f"{k} {_n(v)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v]
    return ", ".join(items) if items else "none"


def format_summary(stats: dict) -> str:
    """The summary `imitation-jax prepare` prints (everything is also in stats.json)."""
    s, c, t = stats["settings"], stats["conversations"], stats["turns"]
    lines = [f"prepared {stats['path']}",
             f"  template {stats['template']}, seq_len {s['seq_len']}, packing {s['packing']}, "
             f"tokenizer {stats['tokenizer']['path']} ({stats['tokenizer']['vocab_size']} ids)"]
    added = stats["tokenizer"]["added_tokens"]
    if added:
        lines.append("  added special tokens: " + ", ".join(f"{k}={v}" for k, v in added.items()))
    dropped = sum(c["dropped"].values())
    lines.append(f"conversations: {_n(c['read'])} read, {_n(c['kept'])} kept, {_n(dropped)} dropped"
                 f" ({_reasons(c['dropped'])})")
    if c.get("invalid"):
        lines.append(f"  invalid records skipped: {_reasons(c['invalid'])} (first ones listed in "
                     f"stats.json)")
    for src in stats["inputs"]:
        lines.append(f"  {src['split']:5s} {src['path']}: {src['format']}, {_n(src['read'])} read, "
                     f"{_n(src['kept'])} kept" + (f", {_n(src['used'])} used ({src['selection']})"
                                                   if src.get("selection") else ""))
    changed = {k[len("turns_"):]: v for k, v in t.items()
               if k.startswith("turns_") and k not in ("turns_read", "turns_kept")}
    lines.append(f"turns: {_n(t.get('turns_read', 0))} read, {_n(t.get('turns_kept', 0))} kept; "
                 f"changed: {_reasons(changed)}")
    ex = {k: v for k, v in t.items() if not k.startswith("turns_")}
    if ex:
        lines.append(f"length handling: {_reasons(ex)}")
    for name, sp in stats["splits"].items():
        if not sp["rows"]:
            continue
        lines.append(
            f"{name}: {_n(sp['conversations'])} conversations, {_n(sp['examples'])} examples -> "
            f"{_n(sp['rows'])} rows; {_n(sp['tokens'])} tokens, {_n(sp['trained_tokens'])} trained "
            f"({sp['trained_tokens'] / max(1, sp['tokens']):.1%})")
        lines.append(f"  packing efficiency {sp['non_pad_fraction']:.1%} non-pad "
                     f"(one example per padded row: {sp['padded_non_pad_fraction']:.1%}, "
                     f"{sp['padded_rows']:,} rows)")
    hist = stats["splits"]["train"]["length_histogram"]
    if any(h["examples"] for h in hist):
        top = max(h["examples"] for h in hist)
        lines.append("train example lengths (tokens):")
        for h in hist:
            bar = "#" * (math.ceil(40 * h["examples"] / top) if h["examples"] else 0)
            lines.append(f"  {h['min']:>6}-{h['max']:<6} {h['examples']:>9,} {bar}")
    kd = stats.get("teacher_logprobs")
    if kd:
        a, p = kd["answers"], kd["positions"]
        fallback = sum(p["fallback"].values())
        lines.append(f"teacher logprobs (top-{kd['k']}): {_n(kd['records'])} records, {_n(a['total'])} answers: "
                     f"{_n(a['exact'])} exact, {_n(a.get('aligned', 0))} aligned from another tokenizer, "
                     f"{_n(a['partial'])} partly, "
                     f"{_n(sum(a['fallback'].values()))} cross entropy only ({_reasons(a['fallback'])})")
        lines.append(f"  answer positions: {_n(p['exact'])} exact and {_n(p.get('aligned', 0))} aligned sparse "
                     f"targets, {_n(fallback)} cross entropy ({_reasons(p['fallback'])}); "
                     f"{_n(p['end_of_turn'])} end-of-turn positions train with cross entropy")
        alt = kd.get("alternatives") or {}
        if any(alt.values()):
            lines.append(f"  alternatives at aligned positions: {_n(alt['folded_into_tail'])} folded into the tail "
                         f"(no single student token), {_n(alt['merged'])} merged (the same student id)")
    div = stats.get("diversity") or {}
    if div.get("mean_max_bleu") is not None:
        lines.append(f"diversity: mean BLEU of a user query to its most similar other query "
                     f"{div['mean_max_bleu']:.1f} (0-100, lower is more diverse; "
                     f"{div['sample']} sampled queries)")
    tm = stats["timing"]
    lines.append(f"time: {tm['seconds']:.1f} s, {tm['conversations_per_s']:,.0f} conversations/s, "
                 f"{tm['tokens_per_s']:,.0f} tokens/s ({tm['workers']} tokenizing "
                 f"worker{'s' if tm['workers'] != 1 else ''})")
    return "\n".join(lines)
