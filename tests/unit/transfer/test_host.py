"""transfer/host.py: host identity tells network namespaces apart; the shared-memory setting decides per peer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pdserve.transfer.host import host_identity, shares_memory_with


def test_identity_holds_boot_and_namespaces() -> None:
    ident = host_identity()
    assert ident == host_identity()
    assert os.readlink("/proc/self/ns/net") in ident and os.readlink("/proc/self/ns/pid") in ident


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_another_network_namespace_is_another_host() -> None:
    code = "from pdserve.transfer.host import host_identity; print(host_identity())"
    same = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    other = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert same == host_identity() and other != host_identity()


def test_setting_decides() -> None:
    assert shares_memory_with("auto", "a", "a") and not shares_memory_with("auto", "a", "b")
    assert shares_memory_with("on", "a", "b") and not shares_memory_with("off", "a", "a")
    with pytest.raises(ValueError):
        shares_memory_with("maybe", "a", "a")
