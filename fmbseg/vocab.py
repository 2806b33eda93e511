"""Vocabularies: the class names a campaign labels, with optional synonyms.

A spec (`--vocab`) is, in this order of precedence,
- a built-in name (`voc20`, `voc21`, `context59`, `context60`, `coco_object`, `coco_stuff171`, `cityscapes`, `ade150`),
- an existing file (local path or fsspec URL), UTF-8 (a byte-order mark is skipped):
  - a COCO JSON (`{"categories": [{"id", "name"}, ...]}`): its category names in id order,
  - a JSON list of names (what the `vocabulary` schema metadata holds),
  - otherwise text, one class per line: `name` or `name: synonym, synonym` (the synonyms' text embeddings are
    averaged with the name's); blank lines and lines starting with `#` are skipped,
- a comma-separated list of names (`cat,dog`; a single name needs a trailing comma when it could be mistaken
  for a file or a built-in name: `traffic_light,`).
A spec that looks like a path or a built-in name but is neither (`myvocab.yaml`, `nonexistent_vocab`, `voc`, a
directory) is a `VocabularyError` with "did you mean" against the built-in names, never a one-class vocabulary.
Class names must be unique case-insensitively (`Red,red` is refused: CLIP's tokenizer lower-cases, so both
would get the same text embedding).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from fmbseg.files import read_bytes
from fmbseg.suggest import close_names, did_you_mean


class VocabularyError(ValueError):
    """A `--vocab` that cannot be used; the message says why and what to give instead."""


@dataclass(frozen=True)
class Vocabulary:
    """`names[k]` is class k; `synonyms[k]` lists the extra prompts averaged into class k's text embedding."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...] = field(default=())

    def __post_init__(self):
        if not self.names:
            raise VocabularyError("a vocabulary needs at least one class name")
        seen: dict[str, str] = {}
        dups = []
        for n in self.names:
            if n.casefold() in seen:
                dups.append(f"{seen[n.casefold()]!r} and {n!r}" if seen[n.casefold()] != n else repr(n))
            seen.setdefault(n.casefold(), n)
        if dups:
            raise VocabularyError(f"duplicate class names in vocabulary (case-insensitive): {', '.join(dups)}")
        if not self.synonyms:
            object.__setattr__(self, "synonyms", tuple(() for _ in self.names))
        if len(self.synonyms) != len(self.names):
            raise VocabularyError("synonyms must have one entry per class name")

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


def parse_vocab_lines(lines, source: str | None = None) -> Vocabulary:
    """Text lines (`name` or `name: synonym, synonym`) -> Vocabulary; errors name `source` when given."""
    where = f" in {source}" if source else ""
    names, syns = [], []
    for i, raw in enumerate(lines, 1):
        line = raw.strip().lstrip("\ufeff").strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        name = name.strip()
        if not name:
            raise VocabularyError(f"vocabulary line {i}{where} has no class name: {raw.rstrip()!r}")
        names.append(name)
        syns.append(tuple(s.strip() for s in rest.split(",") if s.strip()))
    if not names:
        raise VocabularyError(f"no class names{where or ' in the vocabulary'} (one class per line)")
    try:
        return Vocabulary(tuple(names), tuple(syns))
    except VocabularyError as e:
        raise VocabularyError(f"{e}{where}") from None


def _vocab_from_json(doc, path: str) -> Vocabulary:
    if isinstance(doc, dict) and isinstance(doc.get("categories"), list):
        cats = doc["categories"]
        try:
            ordered = sorted(cats, key=lambda c: int(c["id"]))
            names = tuple(str(c["name"]).strip() for c in ordered)
        except (KeyError, TypeError, ValueError):
            raise VocabularyError(f"{path}: COCO categories need an integer 'id' and a 'name' each") from None
        if not names:
            raise VocabularyError(f"{path}: the COCO JSON has no categories")
    elif isinstance(doc, list) and all(isinstance(n, str) for n in doc):
        names = tuple(n.strip() for n in doc)
    else:
        raise VocabularyError(f"{path}: a JSON vocabulary is a COCO file with 'categories' or a list of names")
    if not all(names):
        raise VocabularyError(f"{path}: empty class name")
    try:
        return Vocabulary(names)
    except VocabularyError as e:
        raise VocabularyError(f"{e} in {path}") from None


def read_vocab_file(path: str) -> Vocabulary:
    """A vocabulary file (text lines, COCO JSON or JSON list; UTF-8, BOM skipped), local or an fsspec URL."""
    try:
        data = read_bytes(path)
    except OSError as e:
        raise VocabularyError(f"cannot read vocabulary file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise VocabularyError(
            f"vocabulary file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
            "save it as UTF-8") from None
    stripped = text.lstrip()
    if path.lower().endswith(".json") or stripped.startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if path.lower().endswith(".json"):
                raise VocabularyError(f"vocabulary file {path} is not valid JSON: {e}") from None
        else:
            return _vocab_from_json(doc, path)
    return parse_vocab_lines(text.splitlines(), source=path)


# A spec that names a file: a folder separator, a home/relative prefix or a file extension.
_PATHLIKE = re.compile(r"[/\\]|^[~.]|\.[A-Za-z][A-Za-z0-9]{0,4}$")


def _exists(spec: str) -> tuple[bool, bool]:
    """(is a file, is a folder) for a local path or fsspec URL."""
    if "://" in spec:
        try:
            import fsspec

            fs, p = fsspec.core.url_to_fs(spec)
            return fs.isfile(p), fs.isdir(p)
        except Exception:  # noqa: BLE001 - an unknown protocol is just "not a file"
            return False, False
    return os.path.isfile(spec), os.path.isdir(spec)


def parse_vocab(spec: str) -> Vocabulary:
    """Built-in name, file, or comma-separated names (see the module docstring); raises `VocabularyError`."""
    from fmbseg.vocab_builtin import BUILTIN_VOCABULARIES

    builtins = list(BUILTIN_VOCABULARIES)
    if spec in BUILTIN_VOCABULARIES:
        return Vocabulary(tuple(BUILTIN_VOCABULARIES[spec]))
    is_file, is_dir = _exists(spec)
    if is_file:
        return read_vocab_file(spec)
    hint = did_you_mean(os.path.basename(spec.rstrip("/\\")) or spec, builtins, "built-in vocabularies")
    how = "Or give a file with one class per line, or comma-separated names."
    if is_dir:
        raise VocabularyError(f"vocabulary {spec} is a directory, not a file; {hint} {how}")
    if "," not in spec:
        name = spec.strip()
        if not name:
            raise VocabularyError(f"empty vocabulary; {hint} {how}")
        if _PATHLIKE.search(name) or "://" in name:
            raise VocabularyError(f"vocabulary file not found: {spec}; {hint} {how}")
        if "_" in name or close_names(name, builtins):
            # Looks like a built-in name, not a class: one class would label every pixel of every image.
            raise VocabularyError(f"unknown vocabulary {spec!r}: no such file or built-in name; {hint} "
                                  f"For a one-class vocabulary write {name + ','!r}.")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise VocabularyError(f"empty vocabulary {spec!r}; {hint} {how}")
    return Vocabulary(tuple(names))


def vocab_json(v: Vocabulary) -> str:
    """The `vocabulary` schema metadata: JSON list of names in class-id order."""
    return json.dumps(list(v.names))
