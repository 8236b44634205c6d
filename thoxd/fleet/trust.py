"""Which boxes belong to one owner: they share `fleet_secret`, and prove it without sending it.

A box signs what it sends a peer (the status poll, a forwarded request) with an HMAC of the
secret over the method, the path, the time, who the request is for, and who sends it:

    X-Thox-Fleet: v1 SENDER_ID UNIX_TIME CLIENT SIGNATURE

The receiver checks it (at most MAX_SKEW seconds old) before it believes the sender or the client
named. A status answer carries `proof`, an HMAC over the poll's own signature, so the poller knows
the answer came from a box that holds the secret too, not from any box that answers on the LAN:
requests (prompts) only ever go to a peer that proved it. Without a secret nothing is signed and
nothing is trusted. Not covered: the body (a captured request may be replayed, same body, within
MAX_SKEW) and the answers' integrity on the wire; the fleet is for one owner's LAN.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

HEADER = "x-thox-fleet"
VERSION = "v1"
MAX_SKEW = 300  # s


@dataclass(frozen=True)
class Signed:
    """A verified fleet header: the sending box's install id and the client it acts for."""

    sender: str
    client: str


class FleetTrust:
    def __init__(self, secret: str | None, self_id: str) -> None:
        self._key = secret.encode() if secret else None
        self.self_id = self_id

    @property
    def on(self) -> bool:
        return self._key is not None

    def _mac(self, *parts: str) -> str:
        assert self._key is not None
        return hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, client: str = "-", now: float | None = None) -> str:
        """The header value for a request this box sends a peer."""
        stamp = str(int(time.time() if now is None else now))
        client = quote(client, safe="") or "-"
        mac = self._mac(VERSION, self.self_id, stamp, client, method.upper(), path)
        return f"{VERSION} {self.self_id} {stamp} {client} {mac}"

    def verify(self, value: str, method: str, path: str, now: float | None = None) -> Signed | None:
        """The sender and client of a valid, fresh header; None otherwise (or with no secret)."""
        if self._key is None:
            return None
        parts = value.split(" ")
        if len(parts) != 5 or parts[0] != VERSION:
            return None
        _, sender, stamp, client, mac = parts
        now = time.time() if now is None else now
        if not stamp.isdigit() or abs(now - int(stamp)) > MAX_SKEW:
            return None
        expected = self._mac(VERSION, sender, stamp, client, method.upper(), path)
        if not hmac.compare_digest(expected, mac):
            return None
        return Signed(sender, unquote(client))

    def proof(self, challenge: str) -> str | None:
        """What a status answer carries for a poll signed with `challenge`."""
        return self._mac("proof", challenge) if self._key is not None and challenge else None

    def proves(self, challenge: str, proof: object) -> bool:
        expected = self.proof(challenge)
        if expected is None or not isinstance(proof, str):
            return False
        return hmac.compare_digest(expected, proof)
