"""kvship: move LLM KV cache between datacenters.

Engines embed :class:`kvship.Client` (``async with kvship.Client(path) as client``; or the
blocking :class:`kvship.SyncClient`); every failure they see is a
:class:`kvship.errors.KvshipError`. ``kvshipd`` runs on each cluster; ``kvship`` is the CLI.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Client", "SyncClient", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import kvship.protocol` (sans-IO) never pulls in asyncio and numpy code.
    if name in ("Client", "SyncClient"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvship' has no attribute {name!r}")
