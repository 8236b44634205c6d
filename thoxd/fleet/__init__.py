"""Several boxes as one: peers found over mDNS or named, trusted by a shared secret, and the
requests this box cannot serve now forwarded to them (README, "Fleet")."""
