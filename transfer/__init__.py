"""pdserve.transfer: moves KV bytes between processes behind one interface (`base.KVTransport`); backends `ucx`
(ucx.py, the default) and `mooncake` (mooncake.py), chosen once from `TransferConfig` by `factory.create_transport`."""
