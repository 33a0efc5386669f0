"""The engine-facing API: embed :class:`Client` (or :class:`SyncClient`) in an engine."""

from .api import Client
from .receiver import Receiver
from .sender import Sender, SendResult
from .sync import SyncClient

__all__ = ["Client", "Receiver", "SendResult", "Sender", "SyncClient"]
