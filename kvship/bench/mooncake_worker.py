"""The Mooncake side of ``kvship bench --vs mooncake``: the same bytes through Mooncake's
TransferEngine over TCP, engine memory to engine memory (P2P handshake, no metadata
server), as the system users would pick instead of kvship.

Run by the bench with an interpreter that has ``mooncake-transfer-engine-non-cuda`` (its
own venv: ``make bench-mooncake``). It imports only numpy, mooncake and the standard
library, never kvship, so that venv needs nothing else.

    python mooncake_worker.py recv --bytes N
        prints {"port", "addr"}, waits for one line on stdin, prints {"sha1"}
    python mooncake_worker.py send --bytes N --layers L --chunk-bytes C --target JSON
        prints {"seconds", "sha1"}: layer by layer, one batch_transfer_sync_write each
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any

import numpy as np


def _engine() -> Any:
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("TransferEngine.initialize failed")
    return engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["send", "recv"])
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    parser.add_argument("--target", default="")
    args = parser.parse_args(argv)
    engine = _engine()
    if args.role == "recv":
        buffer = np.zeros(args.bytes, np.uint8)
        ptr = buffer.ctypes.data
        if engine.register_memory(ptr, args.bytes) != 0:
            raise RuntimeError("register_memory failed")
        port = engine.get_rpc_port()
        print(json.dumps({"port": port, "addr": ptr}), flush=True)
        sys.stdin.readline()  # the sender is done
        print(json.dumps({"sha1": hashlib.sha1(buffer.data).hexdigest()}), flush=True)
        return 0
    target = json.loads(args.target)
    buffer = np.frombuffer(np.random.default_rng(0).bytes(args.bytes), np.uint8).copy()
    ptr = buffer.ctypes.data
    if engine.register_memory(ptr, args.bytes) != 0:
        raise RuntimeError("register_memory failed")
    peer = f"127.0.0.1:{target['port']}"
    layer_bytes = args.bytes // args.layers
    t0 = time.perf_counter()
    for layer in range(args.layers):
        start = layer * layer_bytes
        offsets = range(start, start + layer_bytes, args.chunk_bytes)
        lengths = [min(args.chunk_bytes, start + layer_bytes - o) for o in offsets]
        done = engine.batch_transfer_sync_write(
            peer, [ptr + o for o in offsets], [target["addr"] + o for o in offsets], lengths
        )
        if done != 0:
            raise RuntimeError(f"batch_transfer_sync_write returned {done}")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "sha1": hashlib.sha1(buffer.data).hexdigest()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
