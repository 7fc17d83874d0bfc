"""Regenerates the configuration reference (docs/configuration.md, and README.md's marked section
when it has one) from the real `pdserve` argparse parsers, so every config dataclass field and
every subcommand appears without being listed here.

    python -m pdserve.config_docs            # rewrite the files
    python -m pdserve.config_docs --check    # exit 1 when a checked-in table is stale

Which flags honour a `PDSERVE_*` variable is measured, not assumed: each subcommand's parser is
built once with a probe value in every candidate variable, and a flag is env-settable when its
default changed. Owns the docs only; the flags themselves come from `pdserve.settings`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "configuration.md"
README_PATH = REPO_ROOT / "README.md"
START_MARKER = "<!-- config-table:start -->"
END_MARKER = "<!-- config-table:end -->"
ENV_PREFIX = "PDSERVE_"

# Subcommands that are tools or launchers, not long-running components. Every other subcommand is
# a component that compose and Kubernetes start alone, so each of its flags must take a PDSERVE_*
# variable (tests/unit/test_config_docs.py checks it; new subcommands are components by default).
TOOLS = frozenset({"make-model", "generate", "bench", "simulate", "up", "healthcheck"})


@dataclass(frozen=True)
class Flag:
    name: str  # `--block-size`, `--[no-]enable-prefix-caching`, or a positional's METAVAR
    dest: str
    env: str | None  # the PDSERVE_* variable it honours, None when it has none
    default: str  # rendered for the table
    help: str
    group: str


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Within the block, os.environ has no PDSERVE_* variable except `values`."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for k in saved:
        del os.environ[k]
    os.environ.update(values)
    try:
        yield
    finally:
        for k in values:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _subcommands() -> dict[str, tuple[str, str]]:
    from pdserve.cli import SUBCOMMANDS

    return dict(SUBCOMMANDS)


def _build(name: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand `name` (None: the top-level parser's own options)."""
    if name is None:
        from pdserve.cli import build_parser

        return build_parser()
    module_name, help_text = _subcommands()[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"pdserve {name}", description=help_text)
    module.add_arguments(parser)
    return parser


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions  # noqa: SLF001 - argparse offers no public listing
            if a.default is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001


def _env_candidate(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def _probe_value(action: argparse.Action) -> str | None:
    """A string that, read from the environment, would give `action` a default other than its own."""
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        return "false" if action.default else "true"
    if action.choices:
        return next((str(c) for c in action.choices if c != action.default), None)
    convert = action.type if callable(action.type) else str
    for text in ("7", "0.5", "probe-value"):
        try:
            value = convert(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
        if value != action.default:
            return text
    return None


def env_settable(name: str | None) -> dict[str, str | None]:
    """dest -> the PDSERVE_* variable that sets it (None: none does), for subcommand `name`."""
    with _environment({}):
        clean = {a.dest: a.default for a in _actions(_build(name))}
        probes = {_env_candidate(a): v for a in _actions(_build(name)) if (v := _probe_value(a)) is not None}
    with _environment(probes):
        probed = {a.dest: a.default for a in _actions(_build(name))}
    return {dest: (ENV_PREFIX + dest.upper() if probed.get(dest) != default else None)
            for dest, default in clean.items()}


def _render_default(action: argparse.Action) -> str:
    value = action.default
    if action.required:
        return "(required)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    text = str(value)
    return '""' if text == "" else text


def _clean_help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's own %(default)s expansion
        params = {k: getattr(v, "__name__", v) for k, v in vars(action).items()}
        params["prog"] = prog
        with contextlib.suppress(KeyError, TypeError, ValueError):
            text = text % params
    text = re.sub(r"\s*\(env PDSERVE_\w+; [^()]*(\([^()]*\)[^()]*)*\)$", "", text)  # settings.py's suffix
    text = re.sub(r";\s*default:[^;()]*\)$", ")", text)
    text = re.sub(r"\s*\(default:[^()]*\)$", "", text)
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _flag_name(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest.upper())
    if isinstance(action, argparse.BooleanOptionalAction):
        return "--[no-]" + action.option_strings[0][2:]
    return ", ".join(action.option_strings)


def flags(name: str | None) -> list[Flag]:
    """Every option of subcommand `name` (None: the top-level options), in parser order."""
    env = env_settable(name)
    with _environment({}):
        parser = _build(name)
    group_of = {id(a): g.title or "" for g in parser._action_groups for a in g._group_actions}  # noqa: SLF001
    return [Flag(_flag_name(a), a.dest, env.get(a.dest), _render_default(a), _clean_help(a, parser.prog),
                 group_of.get(id(a), ""))
            for a in _actions(parser)]


def _table(rows: list[Flag]) -> list[str]:
    out = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in rows:
        env = f"`{f.env}`" if f.env else "—"
        out.append(f"| `{f.name}` | {env} | `{f.default}` | {f.help} |")
    return out


def render_tables() -> str:
    """The tables alone (what goes between README's markers)."""
    lines: list[str] = []
    top = [f for f in flags(None) if f.dest != "command"]
    lines += ["### Every command", "", "`pdserve [OPTIONS] COMMAND ...`", "", *_table(top), ""]
    for name, (_, help_text) in _subcommands().items():
        rows = flags(name)
        kind = "tool" if name in TOOLS else "component"
        lines += [f"### `pdserve {name}` ({kind})", "", help_text[0].upper() + help_text[1:] + ".", ""]
        groups: dict[str, list[Flag]] = {}
        for f in rows:
            groups.setdefault(f.group, []).append(f)
        named = [g for g in groups if g not in ("options", "positional arguments", "optional arguments")]
        if len(named) > 1:  # e.g. a worker's `worker` and `engine` settings
            for g in groups:
                lines += [f"**{g}**", "", *_table(groups[g]), ""]
        else:
            lines += [*_table(rows), ""]
        missing = [f.name for f in rows if f.env is None and f.name.startswith("--")]
        if missing and name not in TOOLS:
            lines += [f"Not settable from the environment: {', '.join(f'`{m}`' for m in missing)}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_document() -> str:
    return "\n".join([
        "# Configuration",
        "",
        "<!-- Generated by `make config-docs` (python -m pdserve.config_docs) from the real parsers; "
        "do not edit by hand. -->",
        "",
        "Every component (`router`, `prefill`, `decode`, `worker`, and the KV store's commands) takes each "
        "setting as a flag or as the `PDSERVE_<NAME>` environment variable shown beside it, the same way "
        "for every role: a flag beats the variable, the variable beats the default. Boolean variables "
        "take `true/false`, `1/0`, `yes/no` or `on/off`; optional numbers take `none`. A component's "
        "settings are one config dataclass (`router/config.py`, `pdserve/worker_config.py`, "
        "`engine/config.py`, `kvstore/config.py`); this file is regenerated from them, and a test fails when it is stale.",
        "",
        "`pdserve up`'s settings are a dataclass too (`pdserve/up.py`), so they read `PDSERVE_*` "
        "variables like the components; the other tools (`bench`, `generate`, `make-model`, "
        "`healthcheck`) take flags, and the environment column says which of theirs also read a variable. "
        "`pdserve up` passes settings on through `--worker-args` / `--router-args`, and the components "
        "it starts inherit its environment: a `PDSERVE_*` variable set for `up` reaches each of them, "
        "except for the settings `up` passes as flags itself (host, ports, router address, model).",
        "",
        render_tables().rstrip(),
        "",
    ])


def _replace_marked(text: str, tables: str) -> str:
    start, end = text.index(START_MARKER) + len(START_MARKER), text.index(END_MARKER)
    return text[:start] + "\n" + tables + text[end:]


def outputs() -> dict[Path, str]:
    """path -> wanted content: docs/configuration.md always; README.md when it has the markers."""
    wanted = {DOC_PATH: render_document()}
    if README_PATH.exists():
        readme = README_PATH.read_text()
        if START_MARKER in readme and END_MARKER in readme:
            wanted[README_PATH] = _replace_marked(readme, render_tables())
    return wanted


def stale(wanted: dict[Path, str]) -> list[str]:
    """A unified diff per out-of-date file (empty when all are current)."""
    diffs = []
    for path, text in wanted.items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            diffs.append("".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                      f"{path} (checked in)", f"{path} (generated)")))
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.config_docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    wanted = outputs()
    if args.check:
        diffs = stale(wanted)
        if diffs:
            print("configuration docs are stale; run `make config-docs`:\n" + "\n".join(diffs), file=sys.stderr)
            return 1
        return 0
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
