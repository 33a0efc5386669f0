"""``kvship proxy`` without engines (they run in ``make e2e``'s prfaas demo): its errors are
clear and counted, it reads real link figures from a real daemon and real vLLM queue
gauges, its routes name their reason, and the command starts, answers and stops."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import free_port, good_transfer, running_pair
from kvship.bench.spawn import DaemonProcess
from kvship.cli.main import build_parser
from kvship.proxy.app import Proxy, ProxySettings, Route, _kind, _text_length
from kvship.proxy.command import settings_from_args
from kvship.proxy.figures import LinkWatch
from kvship.proxy.upstream import QUEUE_METRICS
from kvship.router import LinkView, RemoteView, Router, RouteRequest

DATA = Path(__file__).parent / "data" / "vllm"


@pytest.fixture
async def proxy_url() -> AsyncIterator[tuple[str, Proxy]]:
    """A proxy whose only local server is a port nobody listens on."""
    proxy = Proxy(ProxySettings(local=(f"http://127.0.0.1:{free_port()}",)))
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", proxy
    finally:
        await runner.cleanup()


async def test_bad_requests_and_a_dead_local_pool_get_clear_errors(
    proxy_url: tuple[str, Proxy],
) -> None:
    url, proxy = proxy_url
    deadline = time.monotonic() + 10
    while proxy.local.members[0].checked_at == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the first health check ran
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/completions", data=b"{nope") as resp:
            assert resp.status == 400
            assert "not JSON" in (await resp.json())["error"]["message"]
        body = {"model": "m", "prompt": "hello", "max_tokens": 2}
        async with http.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 503
            message = (await resp.json())["error"]["message"]
            assert message.startswith("no local server is up: http://127.0.0.1:")
            assert "Connect" in message  # the cause, not just "down"
        async with http.get(url + "/healthz") as resp:
            health = await resp.json()
            assert resp.status == 503 and health["ok"] is False
            assert health["link"] == {"why": "no link daemon configured"}
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
    assert 'kvship_proxy_errors_total{kind="bad_request"} 1.0' in text
    assert 'kvship_proxy_errors_total{kind="no_local_server"} 1.0' in text


def test_the_queue_gauges_are_read_from_real_vllm_metrics() -> None:
    text = (DATA / "metrics-0.32.0.txt").read_text()
    found = dict(QUEUE_METRICS.findall(text))
    assert found == {"running": "2.0", "waiting": "0.0"}  # not the *_by_reason series
    assert "vllm:num_requests_waiting_by_reason" in text


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    with running_pair(tmp_path_factory.mktemp("proxy")) as p:
        yield p


async def test_link_figures_come_from_the_sending_daemon(pair: tuple[DaemonProcess, ...]) -> None:
    a, b = pair
    await good_transfer(a, b)  # the link is up
    async with aiohttp.ClientSession() as http:
        watch = LinkWatch(a.addresses["control"], b.peer)
        await watch.read(http)
        figures = watch.figures
        assert figures is not None and figures["peer"] == b.peer and watch.why == ""
        assert LinkView.from_figures(figures).reachable
        elsewhere = LinkWatch(a.addresses["control"], "127.0.0.1:9")
        await elsewhere.read(http)
        assert elsewhere.figures is None and "has no link to 127.0.0.1:9" in elsewhere.why
        nobody = LinkWatch(f"127.0.0.1:{free_port()}", None)
        await nobody.read(http)
        assert nobody.figures is None and nobody.why.startswith("link daemon 127.0.0.1:")


def test_routes_name_their_reason_in_a_small_label_set() -> None:
    router = Router(500, kv_bytes=100_000.0, max_link_wait_s=2.0)
    up = LinkView(True, cap_Bps=1e9)
    cases = {
        "above_threshold": router.decide(RouteRequest(900), up, RemoteView(0)),
        "below_threshold": router.decide(RouteRequest(100), up, RemoteView(0)),
        "link_budget": router.decide(RouteRequest(900), LinkView(True, cap_Bps=1e6), RemoteView()),
        "remote_queue_deep": router.decide(RouteRequest(900), up, RemoteView(100)),
        "remote_unreachable": router.decide(
            RouteRequest(900), LinkView.unreachable("x"), RemoteView(0)
        ),
    }
    assert {kind: _kind(d) for kind, d in cases.items()} == {k: k for k in cases}
    route = Route("local", "below_threshold", "l=1 <= t=2 \u2014 ok\nnext", notes=["n\u00e9"])
    assert route.header() == "l=1 <= t=2 ? ok?next; n?"


def test_text_prompts_are_measured_without_tokenizing_only_when_plain() -> None:
    assert _text_length("hello") == 5
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert _text_length(messages) == 2 + 8 + 2 + 8
    assert _text_length([1, 2, 3]) is None  # token ids: the count is known anyway
    assert _text_length([{"role": "user", "content": [{"type": "image_url"}]}]) is None


def test_settings_are_checked_before_anything_starts() -> None:
    parser = build_parser()

    def settings(*extra: str) -> ProxySettings:
        return settings_from_args(parser.parse_args(["proxy", "--local", "http://l:1", *extra]))

    ok = settings("--layout", "dense-gqa-8b", "--egress-cap", "10gbit")
    assert ok.egress_cap_Bps == 1.25e9 and ok.layout is not None
    # Whole pages travel (the partial last one at full size): 10 tokens cost a page.
    page = ok.layout.block_tokens * ok.layout.kv_bytes_per_token
    assert ok.router().kv_bytes(10) == ok.router().kv_bytes(1) == page
    assert ok.router().kv_bytes(ok.layout.block_tokens + 1) == 2 * page
    assert ok.router().kv_bytes(0) == 0
    assert settings("--max-link-wait-s", "0").max_link_wait_s is None
    with pytest.raises(ValueError, match="threshold-tokens"):
        settings("--threshold-tokens", "0")
    with pytest.raises(ValueError, match="egress-cap"):
        settings("--egress-cap", "fast")
    with pytest.raises(ValueError):
        settings("--link-control", "no-port")


def test_the_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "proxy.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvship.cli.main", "proxy", "--listen", "127.0.0.1:0",
         "--local", f"http://127.0.0.1:{free_port()}", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        listen = json.loads(ready.read_text())["listen"]
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://{listen}/healthz", timeout=5)
        assert caught.value.code == 503  # answering, with no local server up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "kvship proxy listening on http://" in out
