"""The configuration reference is generated from the real parsers and kept current; every
component's flags take PDSERVE_* variables (pdserve/config_docs.py)."""

from __future__ import annotations

import os

import pytest

from pdserve import config_docs
from pdserve.cli import SUBCOMMANDS

COMPONENTS = [name for name in SUBCOMMANDS if name not in config_docs.TOOLS]


def test_checked_in_configuration_docs_are_current():
    diffs = config_docs.stale(config_docs.outputs())
    assert not diffs, "configuration docs are stale; run `make config-docs`:\n" + "\n".join(diffs)


def test_every_subcommand_has_a_section():
    text = config_docs.render_tables()
    for name in SUBCOMMANDS:
        assert f"### `pdserve {name}`" in text


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_component_flag_takes_its_environment_variable(name):
    missing = sorted(dest for dest, env in config_docs.env_settable(name).items() if env is None)
    assert not missing, f"`pdserve {name}` flags without a PDSERVE_* variable: {missing}"


def test_log_level_takes_its_environment_variable():
    assert config_docs.env_settable(None)["log_level"] == "PDSERVE_LOG_LEVEL"


def test_up_flags_take_environment_variables():
    missing = sorted(dest for dest, env in config_docs.env_settable("up").items() if env is None)
    assert not missing, f"`pdserve up` flags without a PDSERVE_* variable: {missing}"


def test_probe_leaves_the_environment_as_it_was(monkeypatch):
    monkeypatch.setenv("PDSERVE_PORT", "1234")
    before = dict(os.environ)
    assert config_docs.env_settable("router")["port"] == "PDSERVE_PORT"
    assert dict(os.environ) == before


def test_generated_tables_ignore_the_callers_environment(monkeypatch):
    clean = config_docs.render_tables()
    monkeypatch.setenv("PDSERVE_PORT", "1234")
    monkeypatch.setenv("PDSERVE_KV_CACHE_MEMORY_MB", "7")
    assert config_docs.render_tables() == clean


def test_readme_marked_section_is_replaced(tmp_path):
    text = f"intro\n{config_docs.START_MARKER}\nold table\n{config_docs.END_MARKER}\noutro\n"
    out = config_docs._replace_marked(text, "| new |\n")
    assert out == f"intro\n{config_docs.START_MARKER}\n| new |\n{config_docs.END_MARKER}\noutro\n"
