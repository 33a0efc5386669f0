"""The engine-facing API: embed :class:`Client` (or :class:`SyncClient`) in an engine.

``async with Client(path) as client``; ``async with client.send(...) as sender`` /
``async with client.receive(...) as receiver`` (plain ``await`` works too: both return an
:class:`Opening`). Every failure is a :class:`kvship.errors.KvshipError`.
"""

from .api import Client, Opening
from .receiver import Receiver
from .sender import Sender, SendResult
from .sync import SyncClient, SyncReceiver, SyncSender

__all__ = [
    "Client",
    "Opening",
    "Receiver",
    "SendResult",
    "Sender",
    "SyncClient",
    "SyncReceiver",
    "SyncSender",
]
