"""transfer/config.py and factory.py: the backend is chosen once, from TransferConfig, and checked there."""

from __future__ import annotations

import pytest

from pdserve.transfer.config import TransferConfig
from pdserve.transfer.factory import create_transport


def test_config_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="kv_transport"):
        TransferConfig(kv_transport="tcp")
    with pytest.raises(ValueError, match="transfer_shared_memory"):
        TransferConfig(transfer_shared_memory="yes")


@pytest.mark.parametrize("backend", ["ucx", "mooncake"])
def test_factory_builds_the_configured_backend(backend) -> None:
    if backend == "mooncake":
        from pdserve.transfer.mooncake import import_engine

        try:
            import_engine()
        except RuntimeError as exc:
            pytest.skip(str(exc))
    transport = create_transport(TransferConfig(kv_transport=backend, transfer_shared_memory="off"), "127.0.0.1", 0,
                                 num_lanes=2, timeout_s=3.0)
    assert transport.name == backend and type(transport).__name__ == {"ucx": "UCXTransport", "mooncake": "MooncakeTransport"}[backend]
