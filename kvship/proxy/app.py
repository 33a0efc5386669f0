"""``kvship proxy``: an OpenAI-compatible front that prefills each request locally or in
the remote PrfaaS cluster.

Per request it learns the prompt's length (text shorter than the threshold in characters
is short without tokenizing; else the local engine's ``/tokenize``), how much of it the
local decode daemon already holds (``/v1/lookup``), and asks :class:`kvship.router.Router`
with the egress link's live figures and the remote servers' own queue depth. Local: the
request goes to a local PD server as it came. Remote: a remote prefill server computes it
with ``max_tokens=1`` and ships the KV through kvship (the vLLM connector's
``kv_transfer_params``), then a local server decodes it with the KV arriving. The decision
and its reason go to the log, to ``kvship_route_total{path,reason}`` and to the response
headers ``X-Kvship-Route`` / ``X-Kvship-Route-Reason``. A failed remote prefill falls back
to local prefill; the client never sees it fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..client.api import Client
from ..errors import KvshipError
from ..layout.model import ModelLayout
from ..router.policy import REMOTE, Decision, LinkView, RemoteView, Router, RouteRequest
from .figures import LinkWatch
from .upstream import Pool, Upstream

log = logging.getLogger("kvship.proxy")

ROUTE_HEADER = "X-Kvship-Route"
REASON_HEADER = "X-Kvship-Route-Reason"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
CHARS_MARGIN = 64  # special and template tokens a text prompt may gain over its characters
UNSAFE_HEADER = re.compile(r"[^\x20-\x7e]")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class ProxySettings:
    """Where the servers and daemons are, and the routing policy's knobs."""

    local: tuple[str, ...]  # PD servers (vLLM with kvship's connector as kv_both)
    remote: tuple[str, ...] = ()  # prefill servers (kv_producer)
    link_control: str | None = None  # control plane of the daemon that sends the KV
    link_peer: str | None = None  # which of its links (default: the first)
    local_control: str | None = None  # the local decode daemon's control plane (lookup)
    layout: ModelLayout | None = None  # the model's geometry (lookup, KV bytes per token)
    threshold_tokens: float = 19_400.0
    max_link_wait_s: float | None = 5.0
    egress_cap_Bps: float | None = None  # when the link itself has no cap
    upstream_timeout_s: float = 600.0

    def router(self) -> Router:
        return Router(
            self.threshold_tokens,
            egress_cap_Bps=self.egress_cap_Bps,
            kv_bytes=self.shipped_kv_bytes if self.layout is not None else None,
            max_link_wait_s=self.max_link_wait_s,
        )

    def shipped_kv_bytes(self, tokens: float) -> float:
        """The KV bytes a transfer of ``tokens`` new tokens puts on the link: whole pages,
        the partial last one at full size (SPEC §7.6.2; the cached prefix is whole pages), and
        the fixed states. Counting tokens alone under-counts by up to a page, which let a
        request through the link budget that then waited past it."""
        assert self.layout is not None
        if not self.layout.full_layers:
            return float(self.layout.bytes_for(0))
        block = self.layout.block_tokens
        return float(self.layout.bytes_for(math.ceil(tokens / block) * block))


@dataclass
class Route:
    """One request's path, why, and what the router judged."""

    target: str  # "local" | "remote"
    kind: str  # the metric's reason label: a small fixed set
    reason: str
    kv_bytes: float = 0.0
    notes: list[str] = field(default_factory=list)

    def header(self) -> str:
        text = "; ".join([self.reason, *self.notes])
        return UNSAFE_HEADER.sub("?", text)[:1000]


class BadRequest(Exception):
    """The client's request cannot be served; the message says why (HTTP 400)."""


def _kind(decision: Decision) -> str:
    reason = decision.reason
    if reason.startswith("remote unreachable"):
        return "remote_unreachable"
    if reason.startswith("remote queue deep"):
        return "remote_queue_deep"
    if reason.startswith("link would queue"):
        return "link_budget"
    return "above_threshold" if decision.target == REMOTE else "below_threshold"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status)


class Proxy:
    """The proxy's state: pools, link figures, router, metrics. ``app()`` serves it."""

    def __init__(self, settings: ProxySettings) -> None:
        if not settings.local:
            raise ValueError("the proxy needs at least one local server")
        self.settings = settings
        self.router = settings.router()
        self.local = Pool("local", list(settings.local))
        self.remote = Pool("remote", list(settings.remote))
        self.link = LinkWatch(settings.link_control, settings.link_peer)
        self.inflight_bytes = 0.0  # KV of remote requests not decoded yet (estimated)
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._lookup: Client | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._max_model_len: int | None = None
        self.registry = CollectorRegistry()
        self.routes = Counter(
            "kvship_route_total", "Requests routed, by path and reason.",
            ["path", "reason"], registry=self.registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "kvship_proxy_request_seconds", "Request time through the proxy, by path.",
            ["path"], buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.first_byte = Histogram(
            "kvship_proxy_first_byte_seconds",
            "Time to the first response byte (a streamed request's first token), by path.",
            ["path"], buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "kvship_proxy_errors_total", "Requests the proxy answered with an error, or "
            "whose remote prefill failed (they fell back to local), by kind.",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        Gauge(
            "kvship_proxy_remote_inflight_bytes",
            "Estimated KV bytes of remote requests not decoded yet (added to the link's queue "
            "when routing).", registry=self.registry,
        ).set_function(lambda: self.inflight_bytes)  # fmt: skip

    # ------------------------------------------------------------------ lifecycle
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(COMPLETIONS, self.completions)
        app.router.add_post(CHAT, self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._close)
        return app

    async def _start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector)
        if self.settings.local_control and self.settings.layout is not None:
            self._lookup = Client(self.settings.local_control, control=self.settings.local_control)
        self._tasks = [
            asyncio.create_task(self.local.watch(self._session, self._stop)),
            asyncio.create_task(self.remote.watch(self._session, self._stop)),
            asyncio.create_task(self.link.watch(self._session, self._stop)),
        ]

    async def _close(self, app: web.Application) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lookup is not None:
            await self._lookup.aclose()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the proxy app has not started"
        return self._session

    # ------------------------------------------------------------------ handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, COMPLETIONS)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, CHAT)

    async def models(self, request: web.Request) -> web.StreamResponse:
        server = self.local.pick()
        if server is None:
            return _error(503, f"no local server is up: {self.local.why_down()}", "unavailable")
        try:
            async with self.session.get(server.url + "/v1/models") as up:
                return web.Response(
                    status=up.status, body=await up.read(), content_type="application/json"
                )
        except (aiohttp.ClientError, OSError) as exc:
            return _error(502, f"local server {server.url}: {exc}", "upstream_error")

    async def healthz(self, request: web.Request) -> web.Response:
        def pool(p: Pool) -> list[dict[str, Any]]:
            return [
                {"url": m.url, "healthy": m.healthy, "why": m.why, "depth": m.depth}
                for m in p.members
            ]

        ok = bool(self.local.healthy)
        body = {
            "ok": ok,
            "local": pool(self.local),
            "remote": pool(self.remote),
            "link": self.link.figures or {"why": self.link.why},
            "threshold_tokens": self.router.threshold_tokens,
        }
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # ------------------------------------------------------------------ serving
    async def _serve(self, request: web.Request, path: str) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            body = await request.json()
        except ValueError as exc:
            self.errors.labels("bad_request").inc()
            return _error(400, f"the body is not JSON: {exc}")
        server = self.local.pick()
        if server is None:
            self.errors.labels("no_local_server").inc()
            return _error(503, f"no local server is up: {self.local.why_down()}", "unavailable")
        try:
            route = await self._route(body, path, server)
        except BadRequest as exc:
            self.errors.labels("bad_request").inc()
            return _error(400, str(exc))
        rid = f"kvship-{uuid.uuid4().hex[:16]}-{next(self._ids)}"
        try:  # from here the route's KV counts as in flight, whatever ends the request
            if route.target == REMOTE:
                params = await self._remote_prefill(body, path, rid, route)
                if params is not None:
                    body = {**body, "kv_transfer_params": params}
            self.routes.labels(route.target, route.kind).inc()
            log.info("route %s %s (%s): %s", rid, route.target, route.kind, route.header())
            return await self._forward(request, server, path, body, route, started)
        finally:
            if route.kv_bytes:
                self.inflight_bytes = max(0.0, self.inflight_bytes - route.kv_bytes)

    async def _route(self, body: Any, path: str, server: Upstream) -> Route:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        key = "messages" if path == CHAT else "prompt"
        if key not in body:
            raise BadRequest(f"the request has no {key!r}")
        text = _text_length(body[key])
        t = self.router.threshold_tokens
        if text is not None and text + CHARS_MARGIN <= t:
            # A token covers at least one character: no need to tokenize to know it is short.
            reason = f"short prompt: {text} characters, at most {text + CHARS_MARGIN} tokens <= t"
            return Route("local", "below_threshold", f"{reason}={t:.0f}")
        tokens, max_len = await self._tokenize(body, path, server)
        if max_len is None:
            max_len = self._max_model_len = await self._context_length(server)
        wanted = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        if max_len and isinstance(wanted, int) and len(tokens) + wanted > max_len:
            raise BadRequest(
                f"the prompt has {len(tokens)} tokens and max_tokens is {wanted}: more than "
                f"the model's context of {max_len} tokens"
            )
        route = Route("local", "below_threshold", "")
        cached = 0
        if len(tokens) > t and self._lookup is not None and self.settings.layout is not None:
            try:
                cached = await self._lookup.lookup(tokens, self.settings.layout, timeout=1.0)
            except KvshipError as exc:
                route.notes.append(f"local cache unknown ({exc})")
        figures = self.link.figures
        link = (
            LinkView.from_figures(figures)
            if figures is not None
            else LinkView.unreachable(self.link.why)
        )
        if link.reachable and self.inflight_bytes:
            link = dataclasses.replace(
                link, queued_bytes=link.queued_bytes + int(self.inflight_bytes)
            )
        remote_up = bool(self.remote.healthy)
        if not remote_up:
            link = LinkView.unreachable(f"no remote server is up ({self.remote.why_down()})")
        decision = self.router.decide(
            RouteRequest(len(tokens), cached), link, RemoteView(self.remote.queue_depth, remote_up)
        )
        route.target, route.kind, route.reason = decision.target, _kind(decision), decision.reason
        if cached:
            route.notes.append(f"{cached} tokens cached locally")
        if route.target == REMOTE:
            route.kv_bytes = float(self.router.kv_bytes(decision.incremental_tokens) or 0.0)
            self.inflight_bytes += route.kv_bytes
        return route

    async def _tokenize(
        self, body: dict[str, Any], path: str, server: Upstream
    ) -> tuple[list[int], int | None]:
        prompt = body.get("prompt")
        if path == COMPLETIONS and isinstance(prompt, list) and _is_token_ids(prompt):
            return [int(t) for t in prompt], self._max_model_len
        ask: dict[str, Any] = {"model": body.get("model")}
        if path == CHAT:
            ask["messages"] = body["messages"]
            ask["add_generation_prompt"] = body.get("add_generation_prompt", True)
        elif isinstance(prompt, str):
            ask["prompt"] = prompt
        else:
            raise BadRequest("prompt must be a string or a list of token ids (one prompt)")
        try:
            async with self.session.post(server.url + "/tokenize", json=ask) as resp:
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise BadRequest(f"cannot tokenize at {server.url}: {exc}") from exc
        if resp.status != 200 or not isinstance(answer, dict) or "tokens" not in answer:
            message = answer.get("error", answer) if isinstance(answer, dict) else answer
            if isinstance(message, dict):
                message = message.get("message", message)
            raise BadRequest(f"the engine could not tokenize the request: {message}")
        self._max_model_len = answer.get("max_model_len") or self._max_model_len
        return list(answer["tokens"]), self._max_model_len

    async def _context_length(self, server: Upstream) -> int | None:
        """The model's context, from the engine's /v1/models (vLLM: ``max_model_len``)."""
        try:
            async with self.session.get(server.url + "/v1/models") as resp:
                answer = await resp.json(content_type=None)
            return int(answer["data"][0]["max_model_len"])
        except (aiohttp.ClientError, OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    async def _remote_prefill(
        self, body: dict[str, Any], path: str, rid: str, route: Route
    ) -> dict[str, Any] | None:
        """Prefill on a remote server (one token); the params for the local decode, or
        None after falling back to local (the route says why)."""
        server = self.remote.pick()
        why = "no remote server is up"
        if server is not None:
            prefill = {k: v for k, v in body.items() if k not in ("stream_options",)}
            prefill.update(max_tokens=1, stream=False, n=1)
            prefill.pop("max_completion_tokens", None)
            prefill["kv_transfer_params"] = {"do_remote_decode": True, "kvship_request": rid}
            server.in_flight += 1
            try:
                timeout = aiohttp.ClientTimeout(total=self.settings.upstream_timeout_s)
                async with self.session.post(
                    server.url + path, json=prefill, timeout=timeout
                ) as up:
                    answer = await up.json(content_type=None)
                params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
                if up.status == 200 and isinstance(params, dict):
                    return params
                why = f"{server.url} answered {up.status} without kv_transfer_params"
            except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
                why = f"{server.url}: {type(exc).__name__} {exc}"
            finally:
                server.in_flight -= 1
        self.errors.labels("remote_failed").inc()
        log.warning("remote prefill of %s failed, prefilling locally: %s", rid, why)
        self.inflight_bytes = max(0.0, self.inflight_bytes - route.kv_bytes)
        route.target, route.kind, route.kv_bytes = "local", "remote_failed", 0.0
        route.reason = f"remote prefill failed ({why}): prefilled locally; was: {route.reason}"
        return None

    async def _forward(
        self,
        request: web.Request,
        server: Upstream,
        path: str,
        body: dict[str, Any],
        route: Route,
        started: float,
    ) -> web.StreamResponse:
        headers = {ROUTE_HEADER: route.target, REASON_HEADER: route.header()}
        timeout = aiohttp.ClientTimeout(total=self.settings.upstream_timeout_s)
        server.in_flight += 1
        try:
            async with self.session.post(server.url + path, json=body, timeout=timeout) as up:
                headers["Content-Type"] = up.headers.get("Content-Type", "application/json")
                if not body.get("stream"):
                    data = await up.read()
                    self.first_byte.labels(route.target).observe(time.perf_counter() - started)
                    return web.Response(status=up.status, body=data, headers=headers)
                resp = web.StreamResponse(status=up.status, headers=headers)
                await resp.prepare(request)
                first = True
                async for chunk in up.content.iter_any():
                    if first:
                        self.first_byte.labels(route.target).observe(time.perf_counter() - started)
                        first = False
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.errors.labels("local_failed").inc()
            log.warning("local server %s failed: %s", server.url, exc)
            return _error(
                502, f"local server {server.url}: {type(exc).__name__} {exc}", "upstream_error"
            )
        finally:
            server.in_flight -= 1
            self.seconds.labels(route.target).observe(time.perf_counter() - started)


def _is_token_ids(prompt: Any) -> bool:
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )


def _text_length(value: Any) -> int | None:
    """Characters of a text prompt or a chat's messages; None when it is not plain text
    (token ids, images, several prompts): then the proxy tokenizes."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        total = 0
        for message in value:
            content = message.get("content", "")
            if not isinstance(content, str):
                return None
            total += len(content) + 8  # role and separators
        return total
    return None


async def serve(settings: ProxySettings, host: str, port: int, ready: Any = None) -> None:
    """Run the proxy until cancelled (SIGTERM/SIGINT are the caller's)."""
    proxy = Proxy(settings)
    runner = web.AppRunner(proxy.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    if ready is not None:
        ready(f"{bound[0]}:{bound[1]}")
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
