"""The conformance kit (kvship.conformance): proven against the golden vectors, then run
against a real kvshipd (in-process and through ``kvship conformance --json``).

The kit has its own frame codec, chunk codecs and prefix chain written from
protocol/SPEC.md; the vector tests below hold that code to the SPEC's golden bytes, so a
failure of a live check points at the daemon, not at the kit.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvship.bench.spawn import DaemonProcess
from kvship.conformance import Report, Target, run
from kvship.conformance import payload as kit_payload
from kvship.conformance import wire as kit_wire
from kvship.conformance.checks import Transfer, plan, skipped_chunks
from kvship.conformance.report import check_name

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors"
TIMEOUT = 3.0  # per check; passing checks answer in milliseconds on loopback

# Checks that follow SPEC rules the daemon / state machine does not implement yet (SPEC §15
# "code" changes). They are expected to fail until those land; then remove them from here.
PENDING: dict[str, str] = {}  # checks whose SPEC rule the reference does not follow yet


def _vectors(kind: str) -> list[dict[str, Any]]:
    cases = [json.loads(p.read_text()) for p in sorted(VECTORS.glob("*.json"))]
    return [c for c in cases if c["kind"] == kind]


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in cases]


# ------------------------------------------------------------ the kit vs the vectors
BYTE_FIELDS = {"auth", "data", "nonce", "mac"}  # fields the vectors write as hex


def _native(fields: dict[str, Any]) -> dict[str, Any]:
    """Vector fields as the kit's encoder takes them (hex byte strings -> bytes)."""
    return {k: bytes.fromhex(v) if k in BYTE_FIELDS else v for k, v in fields.items()}


def _as_vector(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in fields.items()}


FRAMES = _vectors("frame")


@pytest.mark.parametrize("case", FRAMES, ids=_ids(FRAMES))
def test_kit_frames_match_the_vectors(case: dict[str, Any]) -> None:
    """Decode hex -> the vector's fields; encode those fields -> exactly the hex."""
    raw = bytes.fromhex(case["hex"])
    name, fields, flags = kit_wire.decode(raw)
    assert name == case["type"] and flags == 0
    want = dict(case["fields"])
    coded_raw = want.pop("raw", None)
    assert _as_vector(fields) == want
    assert kit_wire.encode(name, _native(want)).hex() == case["hex"]
    if coded_raw is not None:  # a coded CHUNK: the kit's decoder gives back its bytes
        meta = fields["meta"]
        data = kit_payload.decode_chunk(fields["data"], meta["codec"], meta["raw_length"])
        assert data.hex() == coded_raw
        assert kit_wire.checksum(data) == meta["checksum"]


STREAMS = _vectors("stream")


@pytest.mark.parametrize("case", STREAMS, ids=_ids(STREAMS))
def test_kit_decodes_the_stream_vectors(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    assert data.startswith(kit_wire.MAGIC)
    pos, events = len(kit_wire.MAGIC), []
    while pos < len(data):
        length, ftype, _, _ = kit_wire.HEADER.unpack_from(data, pos)
        end = pos + kit_wire.HEADER_SIZE + length
        if ftype in kit_wire.TYPE_NAMES:
            name, fields, _ = kit_wire.decode(data[pos:end])
            events.append({"type": name, "fields": _as_vector(fields)})
        pos = end
    assert events == case["fields"]["events"]


@pytest.mark.parametrize("case", _vectors("digest"), ids=_ids(_vectors("digest")))
def test_kit_digest_matches_the_vectors(case: dict[str, Any]) -> None:
    fields = case["fields"]
    checksums = [kit_wire.checksum(bytes.fromhex(c)) for c in fields["chunks"]]
    assert checksums == fields["checksums"]
    assert kit_wire.digest(checksums) == fields["digest"]


DEDUP = _vectors("dedup")


@pytest.mark.parametrize("case", DEDUP, ids=_ids(DEDUP))
def test_kit_key_chain_matches_the_vectors(case: dict[str, Any]) -> None:
    """§7.6: namespace, root, block keys, full-prefix key, geometry and skip sets."""
    f = case["fields"]
    manifest, tokens = f["manifest"], f["token_ids"]
    model, rank = manifest["model"], manifest["tp_rank"]
    ns = kit_payload.namespace(model, rank)
    assert ns.hex() == case["hex"] and ns.decode() == f["namespace"]
    keys = kit_payload.block_keys(model, rank, tokens)
    assert [k.hex() for k in keys] == f["keys"] == manifest["keys"]
    assert kit_payload.full_prefix_key(model, rank, tokens).hex() == f["full_prefix_key"]
    assert kit_payload.manifest(model, rank, keys) == manifest
    sizes = kit_payload.layer_nbytes(model, len(tokens))
    assert sizes == [layer["nbytes"] for layer in f["layers"]]
    assert kit_wire.chunk_table(sizes, f["chunk_size"]) == f["chunk_starts"]
    t = Transfer([bytes(n) for n in sizes], f["chunk_size"], token_ids=tokens)
    for skip in f["skips"]:
        got = skipped_chunks(t, model, skip["blocks"], bool(skip["states"]))
        assert sorted(got) == skip["skipped"], skip
    # ... and the OPEN that carries it decodes to it
    opened = json.loads((VECTORS / f"{f['open']}.json").read_text())
    _, fields, _ = kit_wire.decode(bytes.fromhex(opened["hex"]))
    assert fields["extra"]["dedup"] == manifest and fields["token_ids"] == tokens


def test_kit_codecs_round_trip() -> None:
    raw = bytes(range(256)) * 33 + b"!"
    for codec in (kit_wire.CODEC_ZSTD, kit_wire.CODEC_SPLIT16):
        coded = kit_payload.encode_chunk(raw, codec)
        assert len(coded) < len(raw)
        assert kit_payload.decode_chunk(coded, codec, len(raw)) == raw


def test_kit_decoder_refuses_what_the_spec_refuses() -> None:
    ping = kit_wire.encode("PING", {"opaque": 1})
    for bad, code in [
        (ping[:-1], "MALFORMED_FRAME"),  # header says 8 body bytes, 7 follow
        (kit_wire.frame(0x09, bytes(9)), "MALFORMED_FRAME"),  # trailing byte
        (kit_wire.frame(0x09, bytes(8), reserved=1), "MALFORMED_FRAME"),
        (kit_wire.frame(0x7E, b""), "UNKNOWN_FRAME"),
        (kit_wire.frame(0x07, bytes(4)), "FLOW_CONTROL"),  # CREDIT 0
        (
            kit_wire.frame(0x03, bytes(36) + b'{"request_id":"a","request_id":"b"}'),
            "MALFORMED_FRAME",
        ),
    ]:
        with pytest.raises(kit_wire.WireError) as info:
            kit_wire.decode(bad)
        assert info.value.code == code, bad


def test_kit_imports_nothing_of_the_reference() -> None:
    """The kit is a second implementation: no kvship.protocol / payload / layout inside."""
    code = (
        "import sys, kvship.conformance, kvship.conformance.command; "
        "bad = sorted(m for m in sys.modules if m.startswith(('kvship.protocol', "
        "'kvship.payload', 'kvship.layout', 'kvship.daemon', 'kvship.client'))); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------- the kit against a real daemon
def _target(daemon: DaemonProcess) -> Target:
    a = daemon.addresses
    return Target(peer=a["peer"], engines=(a["engine"], a["engine_socket"]), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def report(daemons: tuple[DaemonProcess, ...]) -> Iterator[Report]:
    """The whole kit, in-process, against the decode daemon (all its listeners)."""
    _, decode = daemons
    result = asyncio.run(run(_target(decode)))
    yield result
    assert decode.proc is not None and decode.proc.poll() is None, "the daemon died"


def _names() -> list[str]:
    shape = Target(peer="127.0.0.1:1", engines=("127.0.0.1:2", "/run/kvship.sock"))
    return [check_name(c, listener, shape) for c, listener in plan(shape)]


def _marked(name: str) -> Any:
    if name in PENDING:
        return pytest.param(name, marks=pytest.mark.xfail(reason=PENDING[name], strict=False))
    return name


@pytest.mark.parametrize("name", [_marked(n) for n in _names()])
def test_daemon_passes(report: Report, name: str) -> None:
    result = report.by_name()[name]
    assert result.result == "pass", f"{name} ({result.section}): {result.detail}"


def test_report_shape(report: Report) -> None:
    doc = report.to_json()
    assert set(doc) == {"target", "passed", "failed", "skipped", "checks"}
    assert doc["passed"] + doc["failed"] + doc["skipped"] == len(doc["checks"]) == len(_names())
    for c in doc["checks"]:
        assert {"name", "section", "result", "detail"} <= set(c)
        assert c["result"] in ("pass", "fail", "skip") and c["section"].startswith("§")
    assert [c["name"] for c in doc["checks"][-3:]] == [
        "final.still_serving[peer]",
        "final.still_serving[engine tcp]",
        "final.still_serving[engine unix]",
    ]
    assert "RESULT" in report.table()


def test_cli_json(daemons: tuple[DaemonProcess, ...], report: Report) -> None:
    """``kvship conformance --json`` against the same daemon: one JSON object, exit 0 only
    when nothing failed; nothing fails but the pending checks."""
    _, decode = daemons
    a = decode.addresses
    cmd = [
        sys.executable, "-m", "kvship.cli.main", "conformance",
        "--peer", a["peer"], "--engine", a["engine"], "--engine", a["engine_socket"],
        "--timeout", str(TIMEOUT), "--json",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    doc = json.loads(out.stdout)
    failed = {c["name"] for c in doc["checks"] if c["result"] == "fail"}
    unexpected = {
        c["name"]: c["detail"] for c in doc["checks"] if c["name"] in failed - set(PENDING)
    }
    assert not unexpected, unexpected
    assert out.returncode == (1 if failed else 0), out.stderr
    assert doc["failed"] == len(failed) and doc["skipped"] == 0
    if failed:
        pytest.xfail(f"pending SPEC rules: {sorted(failed)}")


def test_cli_usage() -> None:
    base = [sys.executable, "-m", "kvship.cli.main", "conformance"]
    listed = subprocess.run([*base, "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "handshake.bad_magic" in listed.stdout
    none = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert none.returncode == 2 and "--peer" in none.stderr


async def test_kit_fails_a_target_that_ignores_everything() -> None:
    """The checks are not vacuous: a listener that reads and never answers fails them."""

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        target = Target(peer=f"{host}:{port}", timeout=0.5)
        result = await run(target, ["handshake.bad_magic", "transfer.complete"])
    finally:
        server.close()
        await server.wait_closed()
    assert {c.name: c.result for c in result.checks} == {
        "handshake.bad_magic": "fail",
        "transfer.complete": "fail",
        "final.still_serving": "fail",
    }
    assert not result.ok
