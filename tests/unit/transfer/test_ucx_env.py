"""UCX environment defaults (transfer/ucx_env.py): set only where the user did not, and every value one UCX accepts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pdserve.transfer.ucx_env import UCX_ENV_DEFAULTS, apply_ucx_env_defaults


def test_a_value_the_user_exported_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TCP_TX_SEG_SIZE", "16k")
    for name in UCX_ENV_DEFAULTS:
        if name != "UCX_TCP_TX_SEG_SIZE":
            monkeypatch.delenv(name, raising=False)
    apply_ucx_env_defaults()
    assert os.environ["UCX_TCP_TX_SEG_SIZE"] == "16k"
    assert all(os.environ[name] == value for name, value in UCX_ENV_DEFAULTS.items() if name != "UCX_TCP_TX_SEG_SIZE")


def test_ucx_parses_every_default() -> None:
    """ucx_info reads the same environment as the transport's UCX context; a value it cannot parse fails here."""
    import libucx

    root = Path(libucx.__file__).parent
    ucx_info = root / "bin" / "ucx_info"
    if not ucx_info.exists():
        pytest.skip("this libucx wheel has no ucx_info")
    env = {**os.environ, **UCX_ENV_DEFAULTS, "LD_LIBRARY_PATH": str(root / "lib")}
    out = subprocess.run([str(ucx_info), "-c"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    config = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("UCX_") and "=" in line)
    assert config["UCX_TCP_TX_SEG_SIZE"].lower() in ("64k", "65536")
    assert config["UCX_TCP_RX_SEG_SIZE"].lower() in ("256k", "262144")
    assert config["UCX_RNDV_THRESH"] == "intra:8K,inter:8K"
