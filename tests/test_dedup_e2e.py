"""Prefix dedup between real daemons: a request sharing 90 % of its blocks with one already
delivered sends ~10 % of the bytes and still arrives bit-exact; a lying manifest is refused
before anything is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash

from conftest import running_pair
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.client.sender import Sender
from kvship.errors import TransferError
from kvship.layout import layout_of
from kvship.layout.dedup import Manifest
from kvship.layout.model import FullAttention, LinearState, ModelLayout
from kvship.layout.prefix import block_keys
from kvship.protocol import ErrorCode, chunk_checksum, digest_of_checksums

# A small hybrid: 3 full-attention layers (8 KiB blocks of 16 tokens) and 1 linear state.
MODEL = ModelLayout(
    "tiny-hybrid",
    "tiny-hybrid-test",
    (
        FullAttention(16, 2, 64),
        LinearState(((2, 64, 64),), "float32"),
        FullAttention(16, 2, 64),
        FullAttention(16, 2, 64),
    ),
)
BLOCK = MODEL.layers[0].block_bytes  # type: ignore[union-attr]


def kv_for(tokens: np.ndarray) -> list[np.ndarray]:
    """Deterministic KV: each block's bytes follow from its key (as a real engine's would
    follow from the prefix), so shared prefixes give identical blocks."""
    keys = block_keys(tokens, MODEL)
    n_blocks = -(-len(tokens) // 16)
    layers: list[np.ndarray] = []
    for i, kind in enumerate(MODEL.layers):
        if isinstance(kind, FullAttention):
            blocks = [
                np.random.default_rng(xxhash.xxh64_intdigest(k + bytes([i]))).bytes(BLOCK)
                for k in keys
            ]
            blocks += [bytes(BLOCK)] * (n_blocks - len(keys))  # the partial tail block
            layers.append(np.frombuffer(b"".join(blocks), dtype=np.uint8).copy())
        else:
            seed = xxhash.xxh64_intdigest(tokens.tobytes())
            layers.append(np.random.default_rng(seed).standard_normal((2, 64, 64), np.float32))
    return layers


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("dedup")) as p:
        yield p


async def ship(
    a: DaemonProcess, b: DaemonProcess, rid: str, tokens: np.ndarray, chunk_blocks: int = 2
) -> int:
    """Send with the model's manifest, receive, check every byte; returns the wire bytes."""
    layers = kv_for(tokens)
    before = a.metric("kvship_wire_sent_bytes")
    async with (
        Client(b.socket_path) as receiving_engine,
        Client(a.socket_path, chunk_bytes=chunk_blocks * BLOCK) as sending_engine,
    ):
        receiving = asyncio.create_task(_receive(receiving_engine, rid))
        try:
            sender = await sending_engine.send(
                rid, layout_of(layers), peer=b.peer, token_ids=tokens.tolist(), model=MODEL
            )
            for i, layer in enumerate(layers):
                await sender.put(i, layer)
            await sender.finish(timeout=30)
            got = await asyncio.wait_for(receiving, 30)
        finally:
            receiving.cancel()
    for i, layer in enumerate(layers):
        assert np.array_equal(got[i], layer), f"{rid}: layer {i} differs"
    return int(a.metric("kvship_wire_sent_bytes") - before)


async def _receive(client: Client, rid: str) -> list[np.ndarray]:
    """Receive every layer, and check the engine's digest as SPEC §8 defines it: over the
    checksums of the bytes delivered, chunk by chunk — chunks the far daemon filled in from
    its store included (it used to send the peer link's digest, with 0 for those)."""
    receiver = await client.receive(rid, timeout=30)
    layers = await receiver.all()
    size = receiver.chunk_bytes
    checksums = [
        chunk_checksum(raw[offset : offset + size])
        for raw in (np.ascontiguousarray(layer).view(np.uint8).reshape(-1) for layer in layers)
        for offset in range(0, raw.nbytes, size)
    ]
    assert receiver.digest == digest_of_checksums(checksums), f"{rid}: engine digest"
    return layers


async def test_ninety_percent_shared_prefix_sends_about_ten_percent(
    pair: tuple[DaemonProcess, ...],
) -> None:
    a, b = pair
    rng = np.random.default_rng(1)
    first = rng.integers(0, 50000, 4096, dtype=np.uint32)
    second = first.copy()
    second[int(4096 * 0.9) :] = rng.integers(0, 50000, 4096 - int(4096 * 0.9))
    first_wire = await ship(a, b, "dedup-first", first)
    second_wire = await ship(a, b, "dedup-second", second)
    assert second_wire <= 0.12 * first_wire, (first_wire, second_wire)
    transfers = {t["request_id"]: t for t in b.get_json("/v1/transfers")["transfers"]}
    assert transfers["dedup-second"]["skipped_bytes"] > 0.8 * sum(x.nbytes for x in kv_for(second))


async def test_the_chunk_straddling_the_held_prefix_travels_as_its_tail(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """Chunks of 16 blocks, a prefix of 230 held blocks: per full layer 14 chunks are
    skipped and the 15th (blocks 224-239) travels from block 230 on (CAP_DEDUP_TAIL), so
    exactly the held blocks stay off the wire; the engine still gets every byte and the
    digest over whole chunks (checked in ``_receive``)."""
    a, b = pair
    rng = np.random.default_rng(5)
    first = rng.integers(0, 50000, 4096, dtype=np.uint32)
    second = first.copy()
    second[230 * 16 + 5 :] = rng.integers(0, 50000, 4096 - 230 * 16 - 5)
    first_wire = await ship(a, b, "tail-first", first, chunk_blocks=16)
    second_wire = await ship(a, b, "tail-second", second, chunk_blocks=16)
    transfers = {t["request_id"]: t for t in b.get_json("/v1/transfers")["transfers"]}
    assert transfers["tail-second"]["skipped_bytes"] == 3 * 230 * BLOCK
    sent = {t["request_id"]: t for t in a.get_json("/v1/transfers")["transfers"]}
    assert sent["tail-second"]["skipped_bytes"] == 3 * 230 * BLOCK  # both sides agree
    # 26 of 256 blocks per layer travel (plus the state): 0.106 of the first's wire bytes;
    # whole chunks only would have sent blocks 224-255, 32 of them: 0.129.
    assert second_wire <= 0.11 * first_wire, (second_wire, first_wire)


@pytest.mark.parametrize("engine_api", ["shm", "tcp"])
async def test_the_engine_leaves_out_the_chunks_the_receiver_holds(
    pair: tuple[DaemonProcess, ...], engine_api: str
) -> None:
    """SKIP (CAP_SKIP, SPEC §9.1.1): once the receiver's HAVE is back, the daemon names
    the chunks the engine need not stage; layers put after it copy and hash only the rest.
    Layer 0 goes before the SKIP (whole, its held chunks dropped at the daemon), the others
    after it: every byte arrives, and the engine's digest (0 for what it left out) agrees
    with the daemon's COMPLETE."""
    a, b = pair
    rng = np.random.default_rng(29 if engine_api == "shm" else 39)  # prompts of its own
    first = rng.integers(0, 50000, 4096, dtype=np.uint32)
    second = first.copy()
    second[3000:] = rng.integers(0, 50000, 4096 - 3000)
    await ship(a, b, f"omit-first-{engine_api}", first)
    layers = kv_for(second)
    address = a.socket_path if engine_api == "shm" else a.addresses["engine"]
    rid = f"omit-second-{engine_api}"
    async with Client(b.socket_path) as rx, Client(address, chunk_bytes=2 * BLOCK) as tx:
        receiving = asyncio.create_task(_receive(rx, rid))
        sender = await tx.send(
            rid, layout_of(layers), peer=b.peer, token_ids=second.tolist(), model=MODEL
        )
        await sender.put(0, layers[0])
        for _ in range(300):  # bounded: 3 s for the HAVE round trip and the SKIP
            if sender.held_by_receiver:
                break
            await asyncio.sleep(0.01)
        held = sender.held_by_receiver
        for i in range(1, len(layers)):
            await sender.put(i, layers[i])
        result = await sender.finish(timeout=30)
        got = await asyncio.wait_for(receiving, 30)
    assert all(np.array_equal(got[i], layer) for i, layer in enumerate(layers))
    # 3000 tokens = 187 whole blocks held: 93 whole chunks of 2 blocks per full layer.
    # Layer 0 (chunks 0-127) was put before: only its chunks not at the daemon yet may be
    # named (over TCP some still wait for credit), none it omits. The state (128-129) is new.
    assert held - set(range(128)) == {*range(130, 130 + 93), *range(258, 258 + 93)}, sorted(held)
    assert held & set(range(128)) <= set(range(93))
    assert sender.omitted == 2 * 93  # layers 2 and 3's held chunks: none of them staged
    assert result.total_bytes == sum(x.nbytes for x in layers)


async def test_an_engine_that_leaves_out_a_chunk_nobody_named_fails(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """Only what SKIP named may be missing at END: a chunk left out otherwise fails the
    transfer (PROTOCOL_ERROR), it is never completed short."""
    a, b = pair
    tokens = np.random.default_rng(10).integers(0, 50000, 512, dtype=np.uint32)
    layers = kv_for(tokens)
    async with Client(a.socket_path, chunk_bytes=2 * BLOCK) as tx:
        sender = await tx.send(
            "omit-unnamed", layout_of(layers), peer=b.peer, token_ids=tokens.tolist(), model=MODEL
        )
        sender._omit.add(3)  # as a buggy engine would: nothing told it to
        for i, layer in enumerate(layers):
            await sender.put(i, layer)
        with pytest.raises(TransferError) as info:
            await sender.finish(timeout=30)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert "END after" in str(info.value)


async def test_a_corrupt_engine_chunk_cut_into_a_tail_fails_its_transfer_at_the_sender(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """The tail's checksum covers only the tail, so the receiver cannot see corruption in the
    engine's bytes of a chunk that is cut: the sending daemon checks the whole chunk against
    the engine's checksum first and fails that transfer (CHECKSUM_MISMATCH to the engine);
    the link goes on serving."""
    from conftest import MAGIC, RawPeer, new_tid
    from kvship.protocol import ROLE_ENGINE, Abort, Chunk, ChunkMeta, FrameType, Hello, Open
    from kvship.protocol.geometry import chunk_table

    a, b = pair
    rng = np.random.default_rng(9)
    first = rng.integers(0, 50000, 4096, dtype=np.uint32)
    await ship(a, b, "cut-first", first, chunk_blocks=16)  # b's store holds its blocks
    second = first.copy()
    second[230 * 16 + 3 :] = rng.integers(0, 50000, 4096 - 230 * 16 - 3)
    layers = kv_for(second)
    specs, size = layout_of(layers), 16 * BLOCK
    keys = tuple(block_keys(second, MODEL))
    tid = new_tid()
    engine = await RawPeer.connect(a.addresses["engine"])
    try:
        await engine.send(MAGIC + Hello(ROLE_ENGINE, "cut-engine").encode())
        assert (await engine.read_frame() or (0,))[0] == FrameType.HELLO_ACK
        extra = {"dedup": Manifest(MODEL, 0, keys).to_extra()}
        opened = Open(
            tid, f"cut-{tid:x}", specs, size, token_ids=tuple(second.tolist()),
            peer=b.peer, extra=extra,
        )  # fmt: skip
        await engine.send(opened.encode())
        starts = chunk_table(specs, size)
        tail = starts[0] + 14  # layer 0's chunk holding blocks 224-239: cut at block 230
        for layer, array in enumerate(layers):
            raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1).tobytes()
            for index in range(starts[layer], starts[layer + 1]):
                offset = (index - starts[layer]) * size
                data = raw[offset : offset + size]
                checksum = chunk_checksum(data) ^ (1 if index == tail else 0)
                meta = ChunkMeta(tid, index, layer, offset, len(data), checksum)
                await engine.send(Chunk(meta, memoryview(data)).encode())
        frame = None
        for _ in range(200):
            frame = await engine.read_frame()
            if frame is None or frame[0] == FrameType.ABORT:
                break
        assert frame is not None and frame[0] == FrameType.ABORT, frame
        abort = Abort.decode(memoryview(frame[1]))
        assert abort.code == ErrorCode.CHECKSUM_MISMATCH
        assert f"chunk {tail} does not match the engine's checksum" in abort.message
    finally:
        engine.writer.close()
    third = rng.integers(0, 50000, 512, dtype=np.uint32)
    await ship(a, b, "cut-after", third, chunk_blocks=16)  # the link still serves


async def test_the_same_prompt_again_skips_the_linear_states_too(
    pair: tuple[DaemonProcess, ...],
) -> None:
    a, b = pair
    tokens = np.random.default_rng(2).integers(0, 50000, 2050, dtype=np.uint32)
    first_wire = await ship(a, b, "same-1", tokens)
    again_wire = await ship(a, b, "same-2", tokens)
    # Only the partial tail block's chunk travels again (the exact states are held).
    assert again_wire < 0.05 * first_wire, (first_wire, again_wire)


async def test_a_manifest_whose_keys_lie_is_refused(pair: tuple[DaemonProcess, ...]) -> None:
    """Keys that are not the keys of the transfer's tokens: the receiving daemon refuses
    the transfer (LAYOUT_MISMATCH) before storing anything."""
    a, b = pair
    tokens = np.random.default_rng(3).integers(0, 50000, 512, dtype=np.uint32)
    lying = tokens.copy()
    lying[5] += 1
    layers = kv_for(tokens)
    stored_before = b.metric("kvship_store_bytes")
    async with Client(a.socket_path, chunk_bytes=64 << 10) as client:
        conn = await client._connect("send", client.arena_bytes)
        manifest = Manifest(MODEL, 0, tuple(block_keys(lying, MODEL)))
        sender = Sender(
            conn, "liar", layout_of(layers), b.peer, tokens.tolist(), 64 << 10, 0,
            extra={"dedup": manifest.to_extra()}, chunk_multiple=BLOCK,
        )  # fmt: skip
        with pytest.raises(TransferError) as info:
            for i, layer in enumerate(layers):
                await sender.put(i, layer)
            await sender.finish(timeout=30)
    assert info.value.code == ErrorCode.LAYOUT_MISMATCH, info.value
    assert "does not match its token ids" in info.value.message
    assert b.metric("kvship_store_bytes") == stored_before


async def test_lookup_tells_how_much_of_a_prompt_is_held(pair: tuple[DaemonProcess, ...]) -> None:
    a, b = pair
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, 50000, 1000, dtype=np.uint32)  # 62 full blocks + a tail
    async with Client(control=b.addresses["control"]) as client:
        assert await client.lookup(prompt.tolist(), MODEL) == 0
        await ship(a, b, "lookup-1", prompt)
        assert await client.lookup(prompt.tolist(), MODEL) == 62 * 16
        longer = np.concatenate([prompt[:800], rng.integers(0, 50000, 500, dtype=np.uint32)])
        assert await client.lookup(longer.tolist(), MODEL) == 50 * 16  # 800 tokens = 50 blocks


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{}", id="empty"),
        pytest.param(b'{"model": "no-such-model", "token_ids": [1]}', id="unknown-model"),
        pytest.param(b'{"model": "dense-gqa-8b"}', id="no-token-ids"),
    ],
)
def test_lookup_refuses_bad_requests(pair: tuple[DaemonProcess, ...], body: bytes) -> None:
    import json
    import urllib.error
    import urllib.request

    b = pair[1]
    req = urllib.request.Request(b.url("/v1/lookup"), data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"]


def test_bench_prefix_pair_reports_its_fields() -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "kvship.cli.main", "bench", "--workload", "prefix-pair",
         "--tokens", "1024", "--store-bytes", "1GiB", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["digest_match"] is True
    assert result["second_vs_first"] <= 0.2  # 90 % shared, 4-block chunks at 1024 tokens
    for key in ("first_wire_bytes", "second_wire_bytes", "dedup_saved_bytes"):
        assert result[key] > 0
    for key in ("first_goodput_GBps", "second_goodput_GBps", "second_vs_first_goodput"):
        assert result[key] > 0  # payload-equivalent rates beside the byte savings


async def test_route_takes_the_local_prefix_from_the_store(
    pair: tuple[DaemonProcess, ...],
) -> None:
    """POST /v1/route with token ids and a model: the daemon's own store gives the cached
    prefix, so the router judges only the incremental length."""
    import json
    import urllib.request

    a, b = pair
    prompt = np.random.default_rng(5).integers(0, 50000, 1600, dtype=np.uint32)
    await ship(a, b, "route-1", prompt)
    body = {"token_ids": prompt.tolist(), "model": MODEL.to_dict()}
    req = urllib.request.Request(b.url("/v1/route"), data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        decision = json.loads(resp.read())
    assert decision["incremental_tokens"] == 1600 - 100 * 16, decision  # 100 blocks held


@pytest.mark.parametrize("bad_layer", [0, 1], ids=["full-attention", "linear-state"])
async def test_layers_that_do_not_fit_the_model_are_refused(
    pair: tuple[DaemonProcess, ...], bad_layer: int
) -> None:
    """A layer of the wrong size (paged KV, or a linear state of the wrong shape) for the
    model the manifest names: LAYOUT_MISMATCH before anything is stored."""
    a, b = pair
    tokens = np.random.default_rng(6).integers(0, 50000, 256, dtype=np.uint32)
    layers = kv_for(tokens)
    layers[bad_layer] = np.zeros(layers[bad_layer].nbytes + BLOCK, dtype=np.uint8)
    stored_before = b.metric("kvship_store_bytes")
    async with Client(a.socket_path, chunk_bytes=2 * BLOCK) as client:
        conn = await client._connect("send", client.arena_bytes)
        manifest = Manifest(MODEL, 0, tuple(block_keys(tokens, MODEL)))
        sender = Sender(
            conn, f"misfit-{bad_layer}", layout_of(layers), b.peer, tokens.tolist(), 2 * BLOCK, 0,
            extra={"dedup": manifest.to_extra()}, chunk_multiple=BLOCK,
        )  # fmt: skip
        with pytest.raises(TransferError) as info:
            for i, layer in enumerate(layers):
                await sender.put(i, layer)
            await sender.finish(timeout=30)
    assert info.value.code == ErrorCode.LAYOUT_MISMATCH, info.value
    assert b.metric("kvship_store_bytes") == stored_before


def _post_json(daemon: DaemonProcess, path: str, body: object) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(daemon.url(path), data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("path", ["/v1/lookup", "/v1/route"])
async def test_lookups_naming_other_models_never_evict_held_kv(
    pair: tuple[DaemonProcess, ...], path: str
) -> None:
    """Regression: a look-up used to create a block store for any model it named, and the
    fifth model pushed a real store out: four look-ups naming other presets erased the KV
    held for this one. Look-ups are read-only now."""
    from kvship.layout.presets import PRESETS

    a, b = pair
    prompt = np.random.default_rng(7 + len(path)).integers(0, 50000, 640, dtype=np.uint32)
    await ship(a, b, f"evict-{path[4:]}", prompt)
    held = {"model": MODEL.to_dict(), "token_ids": prompt.tolist()}
    assert _post_json(b, "/v1/lookup", held)["cached_tokens"] == 640
    stored = b.metric("kvship_store_bytes")
    for name in [*PRESETS, *PRESETS]:  # every preset, twice: more than any store limit
        body = {"model": name, "token_ids": prompt[:256].tolist()}
        if path == "/v1/route":
            assert _post_json(b, path, body)["target"] == "local"
        else:
            assert _post_json(b, path, body)["cached_tokens"] == 0
    assert _post_json(b, "/v1/lookup", held)["cached_tokens"] == 640
    assert b.metric("kvship_store_bytes") == stored


async def test_a_have_beyond_the_manifest_aborts_the_transfer(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A receiver that answers HAVE with more blocks than the manifest has keys would make
    the sender skip the partial tail block no key covers: the sender aborts the transfer
    with PROTOCOL_ERROR instead (SPEC §7.6)."""
    import struct

    from conftest import frames_from
    from kvship.protocol import CAP_CODECS, CAP_DEDUP, CAP_STRIPING, FrameType, Have, HelloAck

    async def lying_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for ftype, body in frames_from(reader):
            if ftype == FrameType.HELLO:
                caps = CAP_STRIPING | CAP_CODECS | CAP_DEDUP
                ack = HelloAck(1, caps, 8 << 20, (8 << 20) + 64, 4 << 20, 64, "liar")
                writer.write(ack.encode())
            elif ftype == FrameType.OPEN:
                (tid,) = struct.unpack_from(">Q", body)
                writer.write(Have(tid, 1_000_000, False).encode())

    server = await asyncio.start_server(lying_receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tokens = np.random.default_rng(11).integers(0, 50000, 100, dtype=np.uint32)
    layers = kv_for(tokens)
    try:
        with running_pair(tmp_path_factory.mktemp("liar")) as (a, _b):
            async with Client(a.socket_path, chunk_bytes=2 * BLOCK) as client:
                with pytest.raises(TransferError) as info:
                    async with client.send(
                        "liar", layout_of(layers), peer=f"127.0.0.1:{port}",
                        token_ids=tokens.tolist(), model=MODEL,
                    ) as sender:  # fmt: skip
                        for i, layer in enumerate(layers):
                            await sender.put(i, layer)
                        await sender.finish(timeout=30)
            assert info.value.code == ErrorCode.PROTOCOL_ERROR, info.value
            assert "HAVE" in str(info.value)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("tp_rank", [-1, "2", True, 1.5], ids=["negative", "str", "bool", "float"])
async def test_a_manifest_with_a_bad_tp_rank_is_refused(
    pair: tuple[DaemonProcess, ...], tp_rank: object
) -> None:
    """SPEC §7.6.1: tp_rank is an integer >= 0. Anything else used to kill the receiver's
    dedup task (a negative one) or be coerced (a string, a bool): now ABORT LAYOUT_MISMATCH."""
    a, b = pair
    tokens = np.random.default_rng(12).integers(0, 50000, 64, dtype=np.uint32)
    layers = kv_for(tokens)
    extra = Manifest(MODEL, 0, tuple(block_keys(tokens, MODEL))).to_extra()
    extra["tp_rank"] = tp_rank
    async with Client(a.socket_path, chunk_bytes=2 * BLOCK) as client:
        conn = await client._connect("send", client.arena_bytes)
        sender = Sender(
            conn, f"tp-{tp_rank!r}", layout_of(layers), b.peer, tokens.tolist(), 2 * BLOCK, 0,
            extra={"dedup": extra}, chunk_multiple=BLOCK,
        )  # fmt: skip
        with pytest.raises(TransferError) as info:
            for i, layer in enumerate(layers):
                await sender.put(i, layer)
            await sender.finish(timeout=30)
    assert info.value.code == ErrorCode.LAYOUT_MISMATCH, info.value
