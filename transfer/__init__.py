"""pdserve.transfer: moves KV bytes between processes behind one interface (`base.KVTransport`); backends are
built once from `TransferConfig` by `factory.create_transport` (today: UCX, ucx.py)."""
