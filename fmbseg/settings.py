"""Typed settings: the pydantic base of the Stage-1 and training configs, so each setting is defined once, with its
type, bounds, default and description, and everything else is derived from that one definition: the dict stored in
`campaign.json` or a checkpoint (and so the config hash), the Prefect flows' parameter forms, and the CLI flags
(flows/settings_flags.py).

- `Settings` models are frozen and refuse unknown keys; a bad value is a `SettingsError` (a ValueError) of one line
  that names the field and what it must be, e.g. `invalid Stage-1 config: points_per_side must be an integer >= 1
  (got 0)`.
- Numbers: true/false is refused where a number is expected (pydantic would read it as 1/0); a `float` field
  stores a float, so `{"upscale": 2}` is stored and hashed as 2.0; an `AsGiven(...)` field keeps an int as given
  (settings that have always been hashed as given: lr 1 and lr 1.0 name different checkpoints).
- `overrides_model(cls)`: the same fields, every one optional with default None ("keep the value from below"):
  what a flow's `stage1`/`train` parameter and the CLI flags fill in, so only what a user sets overrides a preset.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, create_model, model_validator


class SettingsError(ValueError):
    """An invalid setting: one line naming the field, what it must be and what was given."""


def _keep_int(v: Any, handler) -> Any:
    out = handler(v)
    return int(v) if isinstance(v, int) else out


def AsGiven(*constraints: Any) -> Any:
    """A number with `constraints` that keeps an int an int (see the module docstring)."""
    return Annotated[(float, *constraints, WrapValidator(_keep_int))]


def _accepts_bool(annotation: Any) -> bool:
    annotation = _unwrap(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts_bool(p) for p in typing.get_args(annotation))
    return annotation is bool or annotation is Any


def _refuse_bools(cls: type[BaseModel], data: Any) -> Any:
    """true/false given for a number: pydantic would read it as 1/0."""
    if isinstance(data, dict):
        for name, v in data.items():
            f = cls.model_fields.get(name)
            if isinstance(v, bool) and f is not None and not _accepts_bool(f.annotation):
                raise ValueError(f"{name} must be {describe_type(f.annotation, f.metadata)} (got {v!r})")
    return data


def _bounds(metadata: list) -> list[str]:
    """"in [0, 1]" / ">= 1" / "> 0" from a field's annotated-types constraints."""
    lo = hi = None
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            lo = ("[", ">=", m.ge)
        elif isinstance(m, annotated_types.Gt):
            lo = ("(", ">", m.gt)
        elif isinstance(m, annotated_types.Le):
            hi = ("]", "<=", m.le)
        elif isinstance(m, annotated_types.Lt):
            hi = (")", "<", m.lt)
    if lo and hi:
        return [f"in {lo[0]}{lo[2]:g}, {hi[2]:g}{hi[0]}"]
    return [f"{b[1]} {b[2]:g}" for b in (lo, hi) if b]


def _unwrap(annotation: Any) -> tuple[Any, list]:
    """(the bare type, its constraints) of an `Annotated[...]` (or a plain type)."""
    if typing.get_origin(annotation) is Annotated:
        base, *meta = typing.get_args(annotation)
        inner, more = _unwrap(base)
        return inner, more + [m for m in meta if not isinstance(m, WrapValidator)]
    return annotation, []


def literal_values(annotation: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` annotation (None for any other type)."""
    annotation = _unwrap(annotation)[0]
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def describe_type(annotation: Any, metadata: list = ()) -> str:
    """What a value of this type must be, in words: "an integer >= 1", "a number in [0, 1]", "one of a, b",
    "an integer >= 1 or auto", "true, false or auto", "a list of strings"."""
    annotation, more = _unwrap(annotation)
    metadata = list(metadata) + more
    values = literal_values(annotation)
    if values is not None:
        return "one of " + ", ".join(map(str, values))
    if typing.get_origin(annotation) in (Union, types.UnionType):
        words: list[str] = []
        for part in typing.get_args(annotation):
            if part is type(None):
                continue
            values = literal_values(part)
            if values is not None:
                words += map(str, values)
            elif _unwrap(part)[0] is bool:
                words += ["true", "false"]
            else:
                words.append(describe_type(part))
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return " ".join(["an integer"] + _bounds(metadata))
    if annotation is float:
        return " ".join(["a number"] + _bounds(metadata))
    if typing.get_origin(annotation) in (tuple, list):
        return "a list of strings" + "".join(f" (at least {m.min_length})" for m in metadata
                                             if isinstance(m, annotated_types.MinLen))
    return "a string"


def _field_error(cls: type[BaseModel], err: dict) -> str:
    loc = [p for p in err["loc"] if isinstance(p, str)]
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not loc:
        return msg
    name = loc[0]
    field = cls.model_fields.get(name)
    if field is None:
        return msg
    if err["type"] == "value_error":
        return msg if name in msg else f"{name}: {msg}"
    return f"{name} must be {describe_type(field.annotation, field.metadata)} (got {err['input']!r})"


def describe_validation_error(cls: type[BaseModel], e: ValidationError, what: str) -> str:
    """One line for a pydantic error of `cls`: unknown fields first (by name, with the known ones), then each bad
    field with what it must be."""
    errors = e.errors(include_url=False)
    unknown = sorted(str(err["loc"][0]) for err in errors if err["type"] == "extra_forbidden")
    if unknown:
        return f"unknown {what} field(s) {unknown}; known fields: {sorted(cls.model_fields)}"
    seen: list[str] = []
    for err in errors:
        line = _field_error(cls, err)
        if line not in seen:
            seen.append(line)
    return f"invalid {what}: " + "; ".join(seen)


class Settings(BaseModel):
    """A frozen, validated group of settings. Subclasses set `what` (named in errors)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    what: ClassVar[str] = "settings"

    @model_validator(mode="before")
    @classmethod
    def _no_bools(cls, data: Any) -> Any:
        return _refuse_bools(cls, data)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise SettingsError(describe_validation_error(type(self), e, self.what)) from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Fields missing from `d` take their defaults; an unknown key is an error naming it."""
        if not isinstance(d, dict):
            raise SettingsError(f"{cls.what} must be a mapping of field names to values, got {type(d).__name__}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Every field as stored (JSON-able: tuples as lists); numbers keep their validated type."""
        return {name: list(v) if isinstance(v, tuple) else v
                for name in type(self).model_fields for v in [getattr(self, name)]}

    def replace(self, **changes: Any):
        """A copy with `changes`, validated like a new config."""
        return type(self)(**{**self.to_dict(), **changes})


class Overrides(BaseModel):
    """Some fields of a `Settings` class; None (the default) keeps the value from below (a preset, the defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    settings: ClassVar[type[Settings]]

    @model_validator(mode="before")
    @classmethod
    def _no_bools(cls, data: Any) -> Any:
        return _refuse_bools(cls, data)

    def overrides(self) -> dict[str, Any]:
        """The fields that were given, as a plain dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self if v is not None}

    @classmethod
    def dict_of(cls, value: "Overrides | dict | None") -> dict[str, Any]:
        """The given fields of `value` (None, a dict or an instance; a dict is validated) as a plain dict."""
        if value is None:
            return {}
        if isinstance(value, dict):
            try:
                value = cls.model_validate(value)
            except ValidationError as e:
                raise SettingsError(describe_validation_error(cls, e, cls.settings.what)) from None
        if not isinstance(value, cls):
            raise SettingsError(f"{cls.settings.what} must be a mapping of field names to values, got "
                                f"{type(value).__name__}")
        return value.overrides()


def overrides_model(cls: type[Settings], name: str, doc: str) -> type[Overrides]:
    """An `Overrides` model with every field of `cls`, each optional with default None and the same type, bounds
    and description (its default appended)."""
    fields: dict[str, Any] = {}
    for fname, f in cls.model_fields.items():
        default = f.default if not isinstance(f.default, tuple) else list(f.default)
        typ = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[fname] = (Optional[typ], Field(None, description=f"{f.description} Default: {default}.",
                                              title=f.title))
    model = create_model(name, __base__=Overrides, __doc__=doc, **fields)
    model.settings = cls
    return model
