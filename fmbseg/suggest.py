""""Did you mean" hints for names given on the command line (vocabularies, presets, datasets)."""

from __future__ import annotations

import difflib
from typing import Iterable


def close_names(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` of `choices` that look like `word` (case-insensitive, best first)."""
    choices = list(choices)
    lower = {c.lower(): c for c in choices}
    key = word.strip().lower()
    hits = difflib.get_close_matches(key, list(lower), n=n, cutoff=0.6)
    # A prefix typo ("ade" for "ade150", "coco" for "coco_object") is as likely as an edit.
    hits += [c for c in lower if len(key) >= 3 and c.startswith(key) and c not in hits]
    return [lower[h] for h in hits[:n]]


def did_you_mean(word: str, choices: Iterable[str], what: str = "") -> str:
    """`"did you mean 'voc21'? (choices: voc20, voc21, ...)"` when something is close to `word`, else
    `"did you mean one of voc20, voc21, ...?"`; `what` names the choices (e.g. "built-in vocabularies")."""
    choices = list(choices)
    close = close_names(word, choices)
    what = f"{what}: " if what else ""
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}? ({what or 'choices: '}{', '.join(choices)})"
    return f"did you mean one of the {what}{', '.join(choices)}?" if what else f"did you mean one of {', '.join(choices)}?"
