"""The text models read when the user gives none, and turning text into a fixed number of tokens.

Calibration reads Python's documentation topics from the start; evaluation reads the same corpus from
EVAL_TEXT_OFFSET on, so that what is measured was never calibrated on; the benchmark reads it from the
start (only speed matters there). Every command that needs N tokens of text goes through text_tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .errors import EvalError

__all__ = ["DEFAULT_SOURCE", "EVAL_TEXT_OFFSET", "default_text", "eval_text", "read_texts", "read_text",
           "text_tokens"]

PathLike = Union[str, "os.PathLike[str]"]

# what a calibration records as its source when it read default_text()
DEFAULT_SOURCE = "pydoc_data.topics"

# evaluation text: the corpus from this character on. Calibration reads it from its start: 32768 tokens
# are about 140 000 characters of it, so the two never overlap.
EVAL_TEXT_OFFSET = 300_000


def default_text() -> str:
    """Python's own documentation topics (~1 MB of English prose), shipped with every Python."""
    from pydoc_data import topics
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def eval_text() -> str:
    """The corpus from the paragraph at EVAL_TEXT_OFFSET on (no overlap with calibration)."""
    text = default_text()
    start = text.find("\n\n", EVAL_TEXT_OFFSET)
    return text[start + 2 if start >= 0 else EVAL_TEXT_OFFSET:]


def read_texts(files: Sequence[PathLike]) -> str:
    """The calibration text of `pytriatt calibrate --text FILE ...`: the files joined by blank lines. Any file
    that can be read counts (a pipe, /dev/stdin); ValueError when none has text, naming the empty ones."""
    parts, empty = [], []
    for f in files:
        p = Path(f).expanduser()
        if p.is_dir():
            raise ValueError(f"--text {p} is a directory; --text takes text files")
        if not p.exists():
            raise FileNotFoundError(f"--text {p}: text file not found")
        try:
            t = p.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ValueError(f"--text {p}: cannot read it ({e.strerror or e})") from None
        if not t.strip():
            empty.append(str(p))
        parts.append(t)
    text = "\n\n".join(parts)
    if not text.strip():
        what = f"{empty[0]} is" if len(empty) == 1 else f"{', '.join(empty)} are"
        raise ValueError(f"--text {what} empty: give text files with some prose, "
                         f"or leave --text out to use Python's documentation")
    return text


def read_text(path: Optional[PathLike]) -> str:
    """The text of `pytriatt eval --text FILE`; eval_text() without one."""
    if path is None:
        return eval_text()
    p = Path(path).expanduser()
    if p.is_dir():
        raise EvalError(f"--text {p} is a directory; give a text file")
    if not p.is_file():
        raise EvalError(f"--text {p}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EvalError(f"--text {p} is empty")
    return text


def text_tokens(model, text: str, n_tokens: int, *, what: str = "the text", repeat: bool = False) -> List[int]:
    """The first n_tokens tokens of text, with BOS where the model uses one.

    Too short a text is refused (EvalError), or with repeat=True read again from its start (a benchmark
    only needs tokens of prose, not n distinct ones)."""
    # tokenize a prefix only (some tokenizers are slow on a megabyte), growing it while too short
    chars = 8 * n_tokens + 64
    while True:
        toks = model.tokenize(text[:chars], add_bos=True)
        if len(toks) > n_tokens or chars >= len(text):
            break
        chars *= 2
    if len(toks) < n_tokens and repeat and len(toks) > 1:
        body = toks[1:]          # the text again, without a second BOS
        while len(toks) < n_tokens:
            toks = toks + body
    if len(toks) < n_tokens:
        raise EvalError(f"{what} has only {len(toks)} tokens, {n_tokens} needed: give a longer --text "
                        f"or fewer --tokens")
    return toks[:n_tokens]
