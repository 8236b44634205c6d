"""thoxd/fleet/peers.py: which peers are used, in which order, and when they leave."""

from __future__ import annotations

from typing import Any

from thoxd.fleet.peers import FORGET_AFTER, Fleet, Peer, PeerModel
from thoxd.fleet.trust import FleetTrust


def _fleet(*urls: str) -> Fleet:
    return Fleet(FleetTrust("a-fleet-secret-of-some-length", "me"), static=list(urls))


def _status(models: list[dict[str, Any]], waiting: int = 0) -> dict[str, Any]:
    return {"id": "x", "models": models, "load": {"slots": 4, "running": 0, "waiting": waiting}}


def test_only_live_trusted_peers_serving_the_model_are_used_least_loaded_first() -> None:
    fleet = Fleet(FleetTrust("a-fleet-secret-of-some-length", "me"), static=[])
    busy = Peer("http://10.0.0.2:8080", "busy")
    idle = Peer("http://10.0.0.3:8080", "idle")
    stranger = Peer("http://10.0.0.4:8080", "stranger")
    gone = Peer("http://10.0.0.5:8080", "gone")
    loaded = {"id": "m", "aliases": ["alias"], "state": "loaded", "slots": 2}
    for peer, running, trusted in ((busy, 2, True), (idle, 0, True), (stranger, 0, False)):
        fleet._peers[peer.url] = peer
        fleet._update(peer, _status([{**loaded, "running": running}]), trusted=trusted)
    fleet._peers[gone.url] = gone  # never answered
    assert [p.name for p, _ in fleet.usable("m")] == ["idle", "busy"]
    assert [p.name for p, _ in fleet.usable("alias")] == ["idle", "busy"]
    assert fleet.usable("other") == []
    assert [p.name for p in fleet.peers()] == ["busy", "idle", "stranger"]  # listed, not used
    idle.forwarding = 2  # this box's own forwards count before the next poll shows them
    assert idle.free_slots(idle.models["m"]) == 0
    assert [p.name for p, _ in fleet.usable("m")] == ["busy", "idle"]
    fleet.failed(idle)
    assert [p.name for p, _ in fleet.usable("m")] == ["busy"]
    assert "idle" not in [p.name for p in fleet.peers()]


def test_free_slots_of_a_model_not_loaded_there_depend_on_its_queue() -> None:
    peer = Peer("http://10.0.0.2:8080", "p")
    fleet = _fleet()
    fleet._update(peer, _status([{"id": "m", "state": "unloaded"}]), trusted=True)
    assert peer.free_slots(peer.models["m"]) == 1
    fleet._update(peer, _status([{"id": "m", "state": "unloaded"}], waiting=3), trusted=True)
    assert peer.free_slots(peer.models["m"]) == 0


def test_mdns_peers_go_on_goodbye_or_after_missed_polls_named_ones_stay() -> None:
    fleet = _fleet("http://10.0.0.9:8080/")
    fleet.found("b._thox._tcp.local.", "b.local", "http://10.0.0.2:8080")
    fleet.found("c._thox._tcp.local.", "c.local", "http://10.0.0.3:8080")
    assert len(fleet._peers) == 3
    fleet.lost("b._thox._tcp.local.")
    assert set(fleet._peers) == {"http://10.0.0.9:8080", "http://10.0.0.3:8080"}
    for peer in list(fleet._peers.values()):
        for _ in range(FORGET_AFTER):
            fleet._missed(peer, "timeout")
    assert set(fleet._peers) == {"http://10.0.0.9:8080"}  # the named one is polled on


def test_a_peer_that_is_this_box_is_dropped_and_not_found_again() -> None:
    fleet = _fleet()
    fleet._selves.add("http://10.0.0.2:8080")
    fleet.found("me._thox._tcp.local.", "me.local", "http://10.0.0.2:8080")
    assert fleet._peers == {}


def test_malformed_model_entries_are_skipped() -> None:
    peer = Peer("http://10.0.0.2:8080", "p")
    body = _status([{"id": "ok", "slots": 1}, {"slots": 2}, {"id": "bad", "slots": "many"}])
    _fleet()._update(peer, body, trusted=True)
    assert list(peer.models) == ["ok"]
    assert peer.models["ok"] == PeerModel("ok", slots=1)
