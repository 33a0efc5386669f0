"""Chunk compression off the event loop: a thread pool with one codec context per worker.

zstandard and numpy release the GIL for the heavy work, so a few threads give real
parallelism while the loop keeps moving bytes. Each worker keeps its own Encoder and
Decoder (their output buffers are reused), so nothing is shared between threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..payload import CODEC_RAW, Decoder, Encoder


class CodecPool:
    def __init__(
        self, workers: int, level: int = 1, observe: Callable[[str, float], None] | None = None
    ) -> None:
        self.workers = workers
        self.observe = observe  # (operation, seconds) of each chunk, for metrics
        self.level = level
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kvship-codec")
        self._local = threading.local()
        self.busy = 0  # encodes/decodes submitted and not finished
        # One worker's encode speed (raw bytes/s): measured as chunks are coded; until
        # then the split16 speed measured on this class of machine (docs/codecs.md).
        self.encode_Bps = 1.5e9

    def _encoder(self) -> Encoder:
        enc = getattr(self._local, "encoder", None)
        if enc is None:
            enc = self._local.encoder = Encoder(level=self.level)
        return enc

    def _decoder(self) -> Decoder:
        dec = getattr(self._local, "decoder", None)
        if dec is None:
            dec = self._local.decoder = Decoder()
        return dec

    def _encode(self, data: memoryview, codec: int) -> tuple[int, memoryview, float]:
        start = time.perf_counter()
        used, wire = self._encoder().encode(data, codec)
        # A coded result is already private (the encoder wrote it once): no copy. One that
        # did not pay is the input itself: nothing is returned (it used to be a private
        # copy of every incompressible chunk, held until the chunk was sent: 512 MiB of it
        # under 64 concurrent transfers, tools/bench_load.py).
        out = wire if used != CODEC_RAW else memoryview(b"")
        return used, out, time.perf_counter() - start

    async def encode(self, data: memoryview, codec: int) -> tuple[int, memoryview]:
        """(codec used, wire bytes): RAW with an empty result when it did not pay."""
        self.busy += 1
        try:
            loop = asyncio.get_running_loop()
            used, wire, seconds = await loop.run_in_executor(
                self._executor, self._encode, data, codec
            )
        finally:
            self.busy -= 1
        if self.observe is not None:
            self.observe("encode", seconds)
        if seconds > 0:
            speed = len(data) / seconds
            self.encode_Bps += 0.2 * (speed - self.encode_Bps)
        return used, wire

    def _decode(
        self, codec: int, wire: memoryview, raw_length: int, checksum: int, out: memoryview
    ) -> float:
        start = time.perf_counter()
        self._decoder().decode(codec, wire, raw_length, checksum, out)  # in the worker thread
        return time.perf_counter() - start

    async def decode(
        self, codec: int, wire: memoryview, raw_length: int, checksum: int, out: memoryview
    ) -> None:
        """Decode into ``out`` and verify the checksum; raises ProtocolError when bad."""
        self.busy += 1
        try:
            loop = asyncio.get_running_loop()
            seconds = await loop.run_in_executor(
                self._executor, self._decode, codec, wire, raw_length, checksum, out
            )
        finally:
            self.busy -= 1
        if self.observe is not None:
            self.observe("decode", seconds)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
