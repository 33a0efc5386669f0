"""README.md's "Embedding the client" examples run as written: their code blocks are
taken from the README and executed against a real daemon pair, with a toy model and
cache standing in for the engine (only the addresses are replaced)."""

from __future__ import annotations

import ast
import asyncio
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import running_pair
from kvship import Client
from kvship.bench.spawn import DaemonProcess

README = Path(__file__).resolve().parents[1] / "README.md"
SOCKET = "/run/kvship/kvshipd.sock"  # the addresses the README uses
PEER = "decode-dc.example:7470"


def readme_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Embedding the client", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (truncated), as numpy can hold it: its uint16 bits, or real
    bfloat16 when ml_dtypes is loaded."""
    bits = (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    try:
        return bits.view(np.dtype("bfloat16"))
    except TypeError:
        return bits


class ToyModel:
    """A "model" with a KV geometry; prefill yields each layer's K and V as bf16."""

    num_layers, num_kv_heads, head_dim = 4, 2, 64

    def __init__(self) -> None:
        self.produced: dict[int, np.ndarray] = {}

    def prefill_layers(self, prompt_ids: Sequence[int]) -> Iterator[np.ndarray]:
        shape = (2, len(prompt_ids), self.num_kv_heads, self.head_dim)
        for i in range(self.num_layers):
            kv = bf16_bits(np.random.default_rng(i).standard_normal(shape, np.float32))
            self.produced[i] = kv
            yield kv


class ToyCache:
    def __init__(self) -> None:
        self.layers: dict[int, np.ndarray] = {}

    def load_layer(self, layer: int, kv: np.ndarray) -> None:
        assert layer not in self.layers
        self.layers[layer] = kv.copy()


def runnable(block: str, replace: dict[str, str]) -> Any:
    for old, new in replace.items():
        assert old in block, f"the README example no longer uses {old!r}"
        block = block.replace(old, new)
    return compile(block, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


async def run_block(code: Any, namespace: dict[str, Any]) -> None:
    coro = eval(code, namespace)  # a coroutine: the block has top-level await
    assert coro is not None
    await coro


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("readme")) as p:
        yield p


async def test_readme_embedding_examples_run_as_written(pair: tuple[DaemonProcess, ...]) -> None:
    a, b = pair
    blocks = readme_blocks()
    [prefill] = [x for x in blocks if "client.send(" in x and "await" in x]
    [decode] = [x for x in blocks if "client.receive(" in x]
    [sync] = [x for x in blocks if "SyncClient" in x]

    model, cache = ToyModel(), ToyCache()
    prompt_ids = list(range(1000, 1077))
    sending: dict[str, Any] = {"model": model, "prompt_ids": prompt_ids}
    receiving: dict[str, Any] = {"cache": cache}
    await asyncio.wait_for(
        asyncio.gather(
            run_block(runnable(decode, {SOCKET: b.socket_path}), receiving),
            run_block(runnable(prefill, {SOCKET: a.socket_path, PEER: b.peer}), sending),
        ),
        60,
    )
    result, receiver = sending["result"], receiving["receiver"]
    assert sorted(cache.layers) == list(range(model.num_layers))
    shape = (2, len(prompt_ids), model.num_kv_heads, model.head_dim)
    for i, kv in cache.layers.items():
        assert kv.shape == shape, "bf16 layers keep their shape, ml_dtypes or not"
        assert kv.dtype == model.produced[i].dtype
        assert np.array_equal(kv, model.produced[i])
    assert receiver.complete and receiver.digest == result.digest
    assert tuple(receiver.token_ids) == tuple(prompt_ids)
    assert result.total_bytes == model.num_layers * int(np.prod(shape)) * 2
    assert all(layer.dtype == "bfloat16" for layer in receiver.layout)  # the wire's label

    # The SyncClient example goes on from the prefill one (its import, its layout), in a
    # thread of its own.
    sync_ns = {**sending, "model": ToyModel()}
    code = runnable(sync, {SOCKET: a.socket_path, PEER: b.peer})
    async with Client(b.socket_path) as client:
        got = asyncio.create_task(client.receive("req-43", timeout=30))
        assert await asyncio.wait_for(asyncio.to_thread(eval, code, sync_ns), 60) is None
        async with await got as rx:
            layers = await rx.all()
    assert all(np.array_equal(x, sync_ns["model"].produced[i]) for i, x in enumerate(layers))
