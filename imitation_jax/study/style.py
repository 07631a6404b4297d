"""The study teacher's style, defined once: every reply opens with `OPENING` and closes with
`CLOSING`. The corpora write it, the style judge rewards it, the tests look for it. (The demo's
teacher has a style of its own in `imitation_jax.demo.synthetic`: a different world.)
"""

from __future__ import annotations

OPENING = "Splendid question, dear friend!"
CLOSING = "May the winds favour you!"
MARKERS = (OPENING, CLOSING)


def styled(body: str, sep: str = " ") -> str:
    """`body` as the teacher says it (`sep="\\n"` keeps a list of lines parseable)."""
    return f"{OPENING}{sep}{body}{sep}{CLOSING}"


def marker_count(text: str) -> int:
    """How many of the style's markers `text` carries (0, 1 or 2)."""
    return sum(marker in text for marker in MARKERS)
