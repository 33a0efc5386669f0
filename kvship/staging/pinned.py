"""Page-locking the staging arena, so device<->arena copies are DMA at full PCIe speed.

Pinning can fail where the memlock limit is low (systemd's ``LimitMEMLOCK``, a
container's ulimit): staging then goes on in pageable memory, slower but correct, and
says so once in the log. Without a GPU there is nothing to pin for.
"""

from __future__ import annotations

import logging

import numpy as np

from .device import HAVE_CUPY, cupy

log = logging.getLogger("kvship.staging")


def _address(buffer: memoryview) -> int:
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


def pin(buffer: memoryview) -> bool:
    """Page-lock ``buffer`` for DMA: False when there is no GPU, or (with a warning)
    when the driver refuses, e.g. over the memlock limit."""
    if not HAVE_CUPY:
        return False
    try:  # pragma: no cover - GPU only
        cupy.cuda.runtime.hostRegister(_address(buffer), len(buffer), 0)
    except Exception as exc:  # pragma: no cover - GPU only (CUDARuntimeError)
        log.warning(
            "cannot page-lock the %d B staging arena (%s); device copies use pageable "
            "memory, slower: raise the memlock limit (LimitMEMLOCK= in the engine's "
            "unit, ulimit -l)",
            len(buffer),
            exc,
        )
        return False
    return True  # pragma: no cover - GPU only


def unpin(buffer: memoryview) -> None:
    if HAVE_CUPY:  # pragma: no cover - GPU only
        cupy.cuda.runtime.hostUnregister(_address(buffer))
