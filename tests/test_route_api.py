"""POST /v1/route: the router on a daemon's control plane, judged on its live link figures."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from conftest import good_transfer, running_pair
from kvship.bench.spawn import DaemonProcess


def post(daemon: DaemonProcess, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(daemon.url("/v1/route"), data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("route")) as p:
        yield p


async def test_route_uses_the_live_link(pair: tuple[DaemonProcess, ...]) -> None:
    a, b = pair
    await good_transfer(a, b)  # the link exists and has figures
    body = {"prompt_tokens": 60000, "peer": b.peer, "remote": {"queue_depth": 0}}
    status, decision = post(a, json.dumps(body).encode())
    assert status == 200, decision
    assert decision["target"] == "remote" and decision["reason"], decision
    short = {**body, "prompt_tokens": 2000}
    status, decision = post(a, json.dumps(short).encode())
    assert status == 200 and decision["target"] == "local", decision


def test_route_without_a_link_decides_local_and_says_why(pair: tuple[DaemonProcess, ...]) -> None:
    status, decision = post(pair[0], b'{"prompt_tokens": 60000, "peer": "127.0.0.1:9"}')
    assert status == 200 and decision["target"] == "local"
    assert "unreachable" in decision["reason"] or "no link" in decision["reason"], decision


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{}", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[1]", id="not-an-object"),
        pytest.param(b'{"prompt_tokens": -5}', id="negative-length"),
    ],
)
def test_route_refuses_requests_without_a_length(
    pair: tuple[DaemonProcess, ...], body: bytes
) -> None:
    status, answer = post(pair[0], body)
    assert status == 400 and answer["error"], answer
