"""CLI flags generated from a settings model (fmbseg/settings.py): one `--field-name` per field, its help text the
field's description with its type, bounds and default, so the CLI, the flows' parameter forms and the stored
configs share one definition of every setting.

Flags default to "not given": only the flags a user passes override (a preset's Stage-1 values, the training
defaults). A value outside the field's type or bounds is a `UsageError` naming the flag (exit status 2).
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from flows.cli import UsageError
from fmbseg.settings import Overrides, SettingsError, describe_type, literal_values


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _metavar(annotation: Any) -> str | None:
    bare = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
    if typing.get_origin(bare) in (typing.Union, __import__("types").UnionType):
        return "|".join(m for m in map(_metavar, typing.get_args(bare)) if m)
    if literal_values(bare) is not None:
        return "|".join(map(str, literal_values(bare)))
    return {int: "N", float: "X", str: "TEXT"}.get(bare, "TEXT")


def add_settings_flags(group, model: type[Overrides], skip: tuple[str, ...] = (),
                       default_note: str = "") -> list[str]:
    """Add a flag per field of `model` (an `Overrides` model) but `skip` to an argparse parser or group; -> the
    field names that got a flag. `default_note` follows each default in the help (e.g. "or the preset's")."""
    names = []
    for name, f in model.settings.model_fields.items():
        if name in skip or name not in model.model_fields:
            continue
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        values = literal_values(f.annotation)
        must = "" if values is not None else f" Must be {describe_type(f.annotation, f.metadata)};"
        help_text = f"{f.description}{must} default {default}{f' {default_note}' if default_note else ''}."
        kwargs: dict[str, Any] = dict(dest=name, default=None, help=help_text.replace("%", "%%"))
        if values is not None:
            kwargs["choices"] = values
        elif typing.get_origin(typing.get_args(f.annotation)[0] if typing.get_origin(f.annotation)
                               is typing.Annotated else f.annotation) in (tuple, list):
            kwargs.update(nargs="+", metavar=name.rstrip("s").upper())
        else:
            kwargs["metavar"] = _metavar(f.annotation)
        group.add_argument(flag_name(name), **kwargs)
        names.append(name)
    return names


def settings_from_args(args: argparse.Namespace, model: type[Overrides], names: list[str]) -> dict[str, Any]:
    """The settings of `names` the user passed, validated (a `UsageError` naming the flag otherwise)."""
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    for name, value in given.items():
        try:
            model.dict_of({name: value})
        except SettingsError as e:
            f = model.settings.model_fields[name]
            why = str(e).removeprefix(f"invalid {model.settings.what}: ").removeprefix(f"{name}: ")
            if why.startswith(f"{name} must be"):  # the type or bounds: say it with the flag and the text given
                shown = " ".join(value) if isinstance(value, list) else value
                raise UsageError(f"{flag_name(name)} must be {describe_type(f.annotation, f.metadata)}, got {shown}"
                                 ) from None
            raise UsageError(f"{flag_name(name)}: {why}") from None
    return model.dict_of(given)
