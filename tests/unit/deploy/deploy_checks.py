"""Checks shared by the compose and Kubernetes tests: a container's command must be a real
`pdserve` subcommand with real flags (parsed by the real parser), and every PDSERVE_* variable it
is given must be one that subcommand reads."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from pdserve import config_docs
from pdserve.cli import SUBCOMMANDS, build_parser

REPO_ROOT = Path(__file__).resolve().parents[3]
DEPLOY_DIR = REPO_ROOT / "deploy"
KVSTORE_MISSING = not {"kvstore-master", "kvstore-node"} <= set(SUBCOMMANDS)
KVSTORE_XFAIL_REASON = "kvstore-master/node land with the KV store issue"


def kvstore_marks(subcommand: str) -> list:
    """Cases about a KV store command: expected to fail (strictly) only while the command does not exist."""
    if not subcommand.startswith("kvstore-"):
        return []
    import pytest

    return [pytest.mark.xfail(KVSTORE_MISSING, strict=True, reason=KVSTORE_XFAIL_REASON)]


def registers_itself(argv: list[str]) -> bool:
    """Commands that tell a peer their own address: workers (--router) and store nodes (--master)."""
    return flag_value(argv, "--router") is not None or flag_value(argv, "--master") is not None


def can_advertise(argv: list[str]) -> bool:
    """True when the command's subcommand has an --advertise-host setting."""
    return str(argv[1]) in SUBCOMMANDS and "advertise_host" in config_docs.env_settable(str(argv[1]))


def check_pdserve_command(argv: list[str], env_names: set[str] = frozenset(), where: str = "") -> str:
    """Parse `argv` (["pdserve", SUBCOMMAND, ...]) with the real parser; returns the subcommand.

    Raises AssertionError naming `where` when the command, a flag, or (for a component) a PDSERVE_*
    variable is unknown.
    """
    assert argv and Path(argv[0]).name == "pdserve", f"{where}: not a pdserve command: {argv}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args([str(a) for a in argv[1:]])
        except SystemExit as exc:
            raise AssertionError(f"{where}: `{' '.join(map(str, argv))}` is rejected by pdserve's parser "
                                 f"(exit {exc.code}): {err.getvalue().strip()}") from None
    subcommand = args.command
    if subcommand in config_docs.TOOLS:  # tools run once beside the components and ignore their settings
        return subcommand
    honoured = {e for e in config_docs.env_settable(subcommand).values() if e}
    honoured |= {e for e in config_docs.env_settable(None).values() if e}
    unknown = sorted(n for n in env_names if n.startswith(config_docs.ENV_PREFIX) and n not in honoured)
    assert not unknown, f"{where}: `pdserve {subcommand}` reads no variable {unknown}"
    return subcommand


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `--flag V` or `--flag=V` in argv (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return str(argv[i + 1])
        if str(arg).startswith(flag + "="):
            return str(arg).split("=", 1)[1]
    return None


_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\})")


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def interpolate(value, variables: dict[str, str]):
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default} and $$ in every string of `value`."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group("name"), m.group("op"), m.group("default")
        if name in variables and not (op == ":-" and variables[name] == ""):
            return variables[name]
        if op is None:
            raise AssertionError(f"${{{name}}} is not set in deploy/.env and has no default")
        return default

    return _VAR.sub(sub, value)
