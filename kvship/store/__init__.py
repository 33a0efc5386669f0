"""The receiving daemon's block store (pure, synchronous): see :mod:`kvship.store.blocks`."""

from .blocks import (
    Admitted,
    BadInput,
    BlockStore,
    KeyMismatch,
    LayoutMismatch,
    Manifest,
    MissingBlock,
    SizeMismatch,
    StateShapeError,
    StoreError,
    StoreFull,
)

__all__ = [
    "Admitted",
    "BadInput",
    "BlockStore",
    "KeyMismatch",
    "LayoutMismatch",
    "Manifest",
    "MissingBlock",
    "SizeMismatch",
    "StateShapeError",
    "StoreError",
    "StoreFull",
]
