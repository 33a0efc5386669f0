"""asyncio glue around the sans-IO protocol, shared by the daemon and the client.

This layer is not in DESIGN.md's first table: both ``daemon`` and ``client`` need the
same adapter, and the client may not import daemon internals (see docs/architecture.md).
"""

from .framed import FramedProtocol, open_connection
from .tasks import spawn

__all__ = ["FramedProtocol", "open_connection", "spawn"]
