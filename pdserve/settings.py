"""Derives command-line flags and `PDSERVE_*` environment variables from config dataclasses.

A component's config dataclass is the one definition of its settings: each field becomes a flag
`--field-name` whose default comes from `PDSERVE_FIELD_NAME` when set, else from the field.
Help text comes from `field(metadata={"help": ...})`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def env_name(field_name: str) -> str:
    return "PDSERVE_" + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of an annotation like `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp: type, optional: bool):
    def convert(text: str) -> Any:
        if optional and text.strip().lower() in ("", "none"):
            return None
        if tp is bool:
            return _parse_bool(text)
        return tp(text)

    convert.__name__ = tp.__name__
    return convert


def field_specs(cls: type) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, title: str | None = None,
                         positional: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass `cls`; env PDSERVE_<FIELD> overrides the default."""
    group = parser.add_argument_group(title or cls.__name__)
    for f, tp, optional in field_specs(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        env = env_name(f.name)
        convert = _converter(tp, optional)
        if env in os.environ:
            default = convert(os.environ[env])
        help_text = f.metadata.get("help", "")
        shown = "required" if default is None and f.default is dataclasses.MISSING else f"default: {default}"
        if f.metadata.get("secret") or not f.repr:
            shown = "secret: not shown"
        help_text = f"{help_text} (env {env}; {shown})"
        if f.name in positional:
            parser.add_argument(f.name, nargs="?" if default is not None else None, default=default,
                                type=convert, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = convert
            kwargs["metavar"] = f.metadata.get("metavar", tp.__name__.upper())
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and env not in os.environ:
            kwargs["required"] = True
        group.add_argument(flag_name(f.name), **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` from parsed args (fields absent from args keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f, _, _ in field_specs(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def markdown_table(cls: type, component: str) -> str:
    """One README table row per field: flag, env var, default, help."""
    rows = []
    for f, tp, optional in field_specs(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")  # type: ignore[misc]
        rows.append(f"| {component} | `{flag_name(f.name)}` | `{env_name(f.name)}` | `{default}` | "
                    f"{f.metadata.get('help', '')} |")
    return "\n".join(rows)
