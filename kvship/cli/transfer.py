"""``kvship send`` and ``kvship recv``: move one request's KV through the local daemon.

Both are thin engines: they use :class:`kvship.Client` exactly as an inference engine
would, so they double as a smoke test of a deployment and as a way to ship saved KV.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bench.workers import stamp, synthetic_layer
from ..client import Client
from ..client.connection import DEFAULT_SOCKET
from ..layout import layer_spec, resolve_dtype, spec_of
from ..protocol import LayerSpec
from .common import (
    UsageError,
    gbps,
    hostport_arg,
    human_bytes,
    print_fields,
    print_json,
    progress,
    run_async,
    size_arg,
)

SYNTHETIC_DTYPES = ("float16", "float32", "uint8")


@dataclass
class LayerSource:
    """The layout of what to send, and each layer on demand (so big files are never all
    in memory: .npy is memory-mapped, .npz members are read one at a time)."""

    specs: tuple[LayerSpec, ...]
    get: Callable[[int], Any]
    origin: str


# ----------------------------------------------------------------- inputs
def load_npy(path: Path) -> LayerSource:
    """An .npy whose first axis is the layer axis."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    if array.ndim < 1 or array.shape[0] == 0:
        raise UsageError(f"{path}: need at least one layer on axis 0, shape is {array.shape}")
    specs = tuple(spec_of(array[i]) for i in range(array.shape[0]))
    return LayerSource(specs, lambda i: array[i], f"{path} ({array.dtype} {array.shape})")


def _npz_header(zf: zipfile.ZipFile, member: str) -> LayerSpec:
    with zf.open(member) as fh:
        major, minor = np.lib.format.read_magic(fh)
        if (major, minor) == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    if dtype.hasobject:
        raise ValueError(f"{member} holds Python objects, not KV")
    return layer_spec(dtype, shape)


def load_npz(path: Path) -> LayerSource:
    """An .npz: one layer per key, in sorted key order (``kvship recv`` writes this)."""
    try:
        npz = np.load(path, allow_pickle=False)
        keys = sorted(npz.files)
        if not keys:
            raise ValueError("the archive holds no arrays")
        specs = tuple(_npz_header(npz.zip, f"{key}.npy") for key in keys)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    return LayerSource(specs, lambda i: npz[keys[i]], f"{path} ({len(keys)} arrays)")


def load_file(name: str) -> LayerSource:
    path = Path(name)
    if not path.is_file():
        raise UsageError(f"no such file: {name}")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from exc
    if path.suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise UsageError(f"{name} is not an .npz (zip) archive")
        return load_npz(path)
    if path.suffix == ".npy":
        if magic != b"\x93NUMPY":
            raise UsageError(f"{name} is not an .npy file (no NUMPY header)")
        return load_npy(path)
    raise UsageError(f"{name}: expected an .npy or .npz file")


def synthetic_source(total: int, n_layers: int, dtype_name: str) -> LayerSource:
    """``n_layers`` equal layers of random KV-like values (fp16 normals; other dtypes reuse
    those bytes), each stamped with its index so no two layers are alike."""
    dtype = np.dtype(dtype_name)
    if n_layers < 1:
        raise UsageError("--layers must be at least 1")
    quantum = n_layers * max(dtype.itemsize, 2)
    if total % quantum:
        raise UsageError(
            f"--synthetic {total} is not a multiple of {quantum} "
            f"({n_layers} layers of {dtype_name}); try a round size like 1GiB"
        )
    layer_bytes = total // n_layers
    if layer_bytes < 8:
        raise UsageError("--synthetic: layers of at least 8 bytes, please")
    base = synthetic_layer(layer_bytes)
    shape = (layer_bytes // dtype.itemsize,)
    spec = layer_spec(dtype, shape)

    def get(i: int) -> np.ndarray:
        return stamp(base, i).view(dtype)

    return LayerSource(
        (spec,) * n_layers, get, f"synthetic {n_layers} x {human_bytes(layer_bytes)}"
    )


def load_token_ids(name: str | None) -> np.ndarray:
    """Token ids travel as uint32 on the wire: check they fit before the transfer starts."""
    if name is None:
        return np.zeros(0, np.uint32)
    try:
        tokens = np.load(name, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--token-ids: cannot read {name}: {exc}") from exc
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise UsageError(
            f"--token-ids: need a 1-D integer array, got {tokens.dtype} {tokens.shape}"
        )
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**32):
        raise UsageError("--token-ids: ids must be in 0 .. 2**32-1")
    return tokens.astype(np.uint32)


# ----------------------------------------------------------------- send
def add_send_parser(sub: Any) -> None:
    p = sub.add_parser(
        "send",
        help="send KV (a file or synthetic) through the local daemon to a peer daemon",
        description="Send one request's KV, layer by layer, through the local kvshipd to the "
        "kvshipd at --peer. An .npy's first axis is the layer axis; an .npz holds one layer "
        "per key (sorted).",
    )
    _daemon_arg(p)
    p.add_argument("--peer", required=True, type=hostport_arg, help="peer daemon host:port")
    p.add_argument("--request-id", required=True, help="the request's id (the receiver asks by it)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="FILE.npy or FILE.npz")
    src.add_argument("--synthetic", type=size_arg, metavar="BYTES", help="e.g. 1GiB of random KV")
    p.add_argument("--layers", type=int, default=32, help="layers of --synthetic (default 32)")
    p.add_argument("--dtype", default="float16", choices=SYNTHETIC_DTYPES, help="of --synthetic")
    p.add_argument("--token-ids", metavar="FILE.npy", help="the prompt's token ids (1-D ints)")
    p.add_argument("--timeout", type=float, default=300.0, help="wait for the ack (s, def. 300)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_send)


def cmd_send(args: argparse.Namespace) -> int:
    if args.file is not None:
        source = load_file(args.file)
    else:
        source = synthetic_source(args.synthetic, args.layers, args.dtype)
    tokens = load_token_ids(args.token_ids)
    result = run_async(_send(args, source, tokens))
    if args.json:
        print_json(result)
    else:
        print_fields(
            [
                ("request_id", result["request_id"]),
                ("source", source.origin),
                ("bytes", f"{result['payload_bytes']} ({human_bytes(result['payload_bytes'])})"),
                ("seconds", f"{result['seconds']:.3f}"),
                ("goodput", f"{result['goodput_GBps']:.3f} GB/s"),
                ("digest", result["digest"]),
            ]
        )
    return 0


async def _send(
    args: argparse.Namespace, source: LayerSource, tokens: np.ndarray
) -> dict[str, Any]:
    client = Client(args.daemon)
    sender = await client.send(
        args.request_id, source.specs, peer=args.peer, token_ids=tokens.tolist()
    )
    total = sum(spec.nbytes for spec in source.specs)
    with progress(total, "send", args.json) as bar:
        try:
            for i, spec in enumerate(source.specs):
                await sender.put(i, _read_layer(source, i))
                bar.update(spec.nbytes)
            result = await sender.finish(args.timeout)
        except BaseException:
            await sender.abort()
            raise
    return {
        "request_id": result.request_id,
        "payload_bytes": result.total_bytes,
        "seconds": round(result.seconds, 6),
        "goodput_GBps": round(gbps(result.total_bytes, result.seconds), 4),
        "digest": f"{result.digest:016x}",
    }


def _read_layer(source: LayerSource, i: int) -> Any:
    try:
        return source.get(i)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{source.origin}: cannot read layer {i}: {exc}") from exc


# ----------------------------------------------------------------- recv
def add_recv_parser(sub: Any) -> None:
    p = sub.add_parser(
        "recv",
        help="receive one request's KV from the local daemon into DIR/ID.npz",
        description="Wait for request --request-id at the local kvshipd and write its layers "
        "to DIR/ID.npz (keys layer_000, ...) and its token ids to DIR/ID.tokens.npy.",
    )
    _daemon_arg(p)
    p.add_argument("--request-id", required=True)
    p.add_argument("--out", default=".", metavar="DIR", help="output directory (default .)")
    p.add_argument("--timeout", type=float, default=30.0, help="wait for the KV (s, default 30)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_recv)


def cmd_recv(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {out_dir}: {exc.strerror}") from exc
    stem = safe_name(args.request_id)
    result = run_async(_recv(args, out_dir / f"{stem}.npz", out_dir / f"{stem}.tokens.npy"))
    if args.json:
        print_json(result)
    else:
        print_fields(
            [
                ("request_id", result["request_id"]),
                ("layers", result["layers"]),
                ("bytes", f"{result['payload_bytes']} ({human_bytes(result['payload_bytes'])})"),
                ("seconds", f"{result['seconds']:.3f}"),
                ("goodput", f"{gbps(result['payload_bytes'], result['seconds']):.3f} GB/s"),
                ("digest", result["digest"]),
                ("written", result["path"]),
            ]
        )
    return 0


def safe_name(request_id: str) -> str:
    """A file name for a request id: anything outside [A-Za-z0-9._-] becomes '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", request_id).lstrip(".")
    return name or "request"


def layer_key(layer: int, n_layers: int) -> str:
    """``layer_007``: zero-padded so that sorted keys are layer order (send reads them so)."""
    return f"layer_{layer:0{max(3, len(str(n_layers - 1)))}d}"


async def _recv(args: argparse.Namespace, npz_path: Path, tokens_path: Path) -> dict[str, Any]:
    client = Client(args.daemon)
    receiver = await client.receive(args.request_id, timeout=args.timeout)
    started = time.perf_counter()
    n = len(receiver.layout)
    part = npz_path.with_name(npz_path.name + ".part")
    written = False
    try:
        # Each layer goes straight into the archive: the iterator's array is a view that
        # is only valid until the next step, and we never hold the whole KV in memory.
        with (
            zipfile.ZipFile(part, "w") as zf,
            progress(receiver.total_bytes, "recv", args.json) as bar,
        ):
            async for layer, array in receiver:
                with zf.open(f"{layer_key(layer, n)}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, array, allow_pickle=False)
                bar.update(array.nbytes)
        seconds = time.perf_counter() - started
        os.replace(part, npz_path)
        written = True
        np.save(tokens_path, np.asarray(receiver.token_ids, dtype=np.uint32))
    finally:
        receiver.close()
        if not written:
            with contextlib.suppress(OSError):
                part.unlink()
    unknown = sorted({s.dtype for s in receiver.layout if _is_raw(s)})
    return {
        "request_id": receiver.request_id,
        "payload_bytes": receiver.total_bytes,
        "seconds": round(seconds, 6),
        "layers": n,
        "path": str(npz_path),
        "tokens_path": str(tokens_path),
        "digest": f"{receiver.digest:016x}" if receiver.digest is not None else None,
        **({"raw_dtypes": unknown} if unknown else {}),
    }


def _is_raw(spec: LayerSpec) -> bool:
    """True when numpy here lacks the dtype (bf16 without ml_dtypes): saved as raw bytes."""
    return resolve_dtype(spec.dtype) == np.uint8 and spec.dtype != "uint8"


def _daemon_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--daemon",
        default=None,
        metavar="ADDR",
        help="local kvshipd: Unix socket path or host:port "
        f"(default: $KVSHIP_ADDRESS, else {DEFAULT_SOCKET})",
    )
