"""thoxd/fleet/trust.py: signatures only the holders of one secret make and accept."""

from __future__ import annotations

from thoxd.fleet.trust import MAX_SKEW, FleetTrust

SECRET = "a-fleet-secret-of-some-length"


def test_a_signature_names_its_sender_and_client_to_a_box_with_the_same_secret() -> None:
    a, b = FleetTrust(SECRET, "box-a"), FleetTrust(SECRET, "box-b")
    value = a.sign("POST", "/v1/chat/completions", "ip:10.0.0.7")
    signed = b.verify(value, "POST", "/v1/chat/completions")
    assert signed is not None
    assert (signed.sender, signed.client) == ("box-a", "ip:10.0.0.7")


def test_a_signature_is_refused_for_another_secret_request_or_time() -> None:
    a = FleetTrust(SECRET, "box-a")
    value = a.sign("POST", "/v1/completions", "key_1", now=1_000_000)
    other = FleetTrust("another-secret-entirely", "box-b")
    assert other.verify(value, "POST", "/v1/completions", now=1_000_000) is None
    assert a.verify(value, "POST", "/v1/embeddings", now=1_000_000) is None  # another path
    assert a.verify(value, "GET", "/v1/completions", now=1_000_000) is None  # another method
    assert a.verify(value, "POST", "/v1/completions", now=1_000_000 + MAX_SKEW + 1) is None
    assert a.verify(value, "POST", "/v1/completions", now=1_000_000 + MAX_SKEW) is not None
    forged = value.replace("key_1", "owner")  # another client under the same signature
    assert a.verify(forged, "POST", "/v1/completions", now=1_000_000) is None
    assert a.verify("v1 garbage", "POST", "/v1/completions") is None
    assert FleetTrust(None, "box-c").verify(value, "POST", "/v1/completions") is None


def test_a_status_proof_holds_only_for_its_own_poll_and_secret() -> None:
    poller, peer = FleetTrust(SECRET, "box-a"), FleetTrust(SECRET, "box-b")
    challenge = poller.sign("GET", "/fleet/status")
    proof = peer.proof(challenge)
    assert poller.proves(challenge, proof)
    assert not poller.proves(poller.sign("GET", "/fleet/status", "x"), proof)  # another poll
    assert not poller.proves(challenge, FleetTrust("another-secret-entirely", "c").proof(challenge))
    assert not poller.proves(challenge, None)
    assert FleetTrust(None, "box-d").proof(challenge) is None
    assert not FleetTrust(None, "box-d").proves(challenge, proof)


def test_clients_with_spaces_or_separators_survive_the_header() -> None:
    a = FleetTrust(SECRET, "box-a")
    signed = a.verify(a.sign("POST", "/v1/completions", "ip:fe80::1 x"), "POST", "/v1/completions")
    assert signed is not None and signed.client == "ip:fe80::1 x"
