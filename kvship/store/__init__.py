"""The receiving daemon's block store (pure, synchronous): see :mod:`kvship.store.blocks`."""

from .blocks import (
    BadInput,
    BlockStore,
    ByteBudget,
    LayoutMismatch,
    SizeMismatch,
    StateShapeError,
    StoreError,
    StoreFull,
)

__all__ = [
    "BadInput",
    "BlockStore",
    "ByteBudget",
    "LayoutMismatch",
    "SizeMismatch",
    "StateShapeError",
    "StoreError",
    "StoreFull",
]
