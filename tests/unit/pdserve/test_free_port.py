"""free_port: ports for processes started later, picked where outgoing connections cannot take them."""

from __future__ import annotations

import socket

from pdserve import cluster
from pdserve.cluster import free_port


def test_ports_lie_below_the_ephemeral_range_and_are_bindable():
    low, _ = cluster._ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports), "free_port handed out one port twice"
    if low - 1 > cluster._PORT_FLOOR:
        assert all(cluster._PORT_FLOOR <= p < low for p in ports), (low, sorted(ports)[:5], sorted(ports)[-5:])
    for p in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_listening_port_is_not_handed_out(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(cluster, "_ephemeral_range", lambda: (taken + 2, 60999))
        monkeypatch.setattr(cluster, "_PORT_FLOOR", taken)  # picks among taken and taken + 1
        port = free_port()
        assert port != taken
