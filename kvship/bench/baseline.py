"""The physical limit for Python here: plain uvloop sender -> receiver, no protocol at all.

Sender: ``loop.sock_sendall`` of one preallocated buffer, chunk by chunk. Receiver: a
``BufferedProtocol`` that ``recv_into``s a preallocated buffer. What kvship achieves is
reported as a ratio of this, measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time


class _Sink(asyncio.BufferedProtocol):
    def __init__(self, total: int, done: asyncio.Future[float]) -> None:
        self.buf = memoryview(bytearray(min(total, 64 << 20)))
        self.total, self.got, self.done = total, 0, done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        if self.got >= self.total and not self.done.done():
            self.done.set_result(time.monotonic())


async def receive(port_file: str, total: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    server = await loop.create_server(lambda: _Sink(total, done), "127.0.0.1", 0)
    with open(port_file, "w") as fh:
        fh.write(str(server.sockets[0].getsockname()[1]))
    t_end = await done
    server.close()
    return {"t_end": t_end}


async def send(port: int, total: int, chunk: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    payload = memoryview(bytearray(chunk))
    t0 = time.monotonic()
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        await loop.sock_sendall(sock, payload[:n])
        sent += n
    sock.close()
    return {"t_start": t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvship.bench.baseline")
    parser.add_argument("role", choices=["send", "recv"])
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--port-file", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    import uvloop

    if args.role == "recv":
        out = uvloop.run(receive(args.port_file, args.bytes))
    else:
        out = uvloop.run(send(args.port, args.bytes, args.chunk_bytes))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
