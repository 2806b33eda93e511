"""Vocabularies: the class names a campaign labels, with optional synonyms.

A spec is one of
- a built-in name (`voc20`, `voc21`, `context59`, `coco_object`, `coco_stuff171`, `cityscapes`, `ade150`),
- a path to a text file, one class per line: `name` or `name: synonym, synonym` (the synonyms' text embeddings
  are averaged with the name's); blank lines and lines starting with `#` are skipped,
- a comma-separated list of names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Vocabulary:
    """`names[k]` is class k; `synonyms[k]` lists the extra prompts averaged into class k's text embedding."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...] = field(default=())

    def __post_init__(self):
        if not self.names:
            raise ValueError("a vocabulary needs at least one class name")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"duplicate class names in vocabulary: {dup}")
        if not self.synonyms:
            object.__setattr__(self, "synonyms", tuple(() for _ in self.names))
        if len(self.synonyms) != len(self.names):
            raise ValueError("synonyms must have one entry per class name")

    def __len__(self) -> int:
        return len(self.names)

    def prompts(self) -> list[list[str]]:
        """Per class, the names whose text embeddings are averaged (the name first)."""
        return [[n, *s] for n, s in zip(self.names, self.synonyms)]

    def to_json(self) -> dict:
        return {"names": list(self.names), "synonyms": [list(s) for s in self.synonyms]}

    @classmethod
    def from_json(cls, d: dict) -> "Vocabulary":
        return cls(tuple(d["names"]), tuple(tuple(s) for s in d.get("synonyms") or [() for _ in d["names"]]))


def parse_vocab_lines(lines) -> Vocabulary:
    names, syns = [], []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"vocabulary line has no class name: {raw!r}")
        names.append(name)
        syns.append(tuple(s.strip() for s in rest.split(",") if s.strip()))
    return Vocabulary(tuple(names), tuple(syns))


def parse_vocab(spec: str) -> Vocabulary:
    """Built-in name, file path, or comma-separated names (in that order of precedence)."""
    from fmbseg.vocab_builtin import BUILTIN_VOCABULARIES

    if spec in BUILTIN_VOCABULARIES:
        return Vocabulary(tuple(BUILTIN_VOCABULARIES[spec]))
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return parse_vocab_lines(f)
    if spec.endswith((".txt", ".json")) and not os.path.exists(spec):
        raise FileNotFoundError(f"vocabulary file not found: {spec}")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"empty vocabulary {spec!r}: give names, a file or one of {sorted(BUILTIN_VOCABULARIES)}")
    return Vocabulary(tuple(names))


def vocab_json(v: Vocabulary) -> str:
    """The `vocabulary` schema metadata: JSON list of names in class-id order."""
    return json.dumps(list(v.names))
