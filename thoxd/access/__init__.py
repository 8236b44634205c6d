"""Who may use the box, how much, and what they used: keys, limits, the usage ledger.

Off until the owner sets `owner_key`: then every API request names a key, the guard
(thoxd/guards/access.py) resolves it to a `Caller`, the limiter counts its requests, and the
ledger its tokens. Keys and usage live in one SQLite database in the state directory.
"""

from thoxd.access.callers import Caller, Limits
from thoxd.access.database import AccessDb
from thoxd.access.keys import KeyRecord, KeyStore
from thoxd.access.ledger import UsageLedger
from thoxd.access.limiter import Limiter

__all__ = ["AccessDb", "Caller", "KeyRecord", "KeyStore", "Limiter", "Limits", "UsageLedger"]
