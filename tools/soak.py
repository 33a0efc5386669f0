"""A bounded soak: many transfers between two real kvshipd through a fault-injecting proxy.

    prefill kvshipd --peer--> FaultProxy (resets, stalls, truncations, bit flips, delays)
        --> decode kvshipd

An engine on the prefill side sends each transfer (seeded random layers and token ids)
with ``peer`` = the proxy; an engine on the decode side receives it and compares every
delivered layer, the token ids and the layout, bit for bit with what was sent. Each
transfer ends as one of:

``completed_bitexact``  everything arrived, equal
``failed_clean``        a kvship API (sender's or receiver's) raised a KvshipError
``failed_unclear``      an API raised something else (its contract says it must not)
``corrupted``           a delivered layer differs, or a completed transfer's token ids or
                        layout do: must never happen
``lost``                no error and no delivery within the transfer's deadline

Differing token ids/layout of a transfer that then failed are counted apart
(``metadata_corrupted_then_failed``); so are transfers delivered bit-exact whose sender
was told they failed (``sender_failed_after_delivery``).

Between daemons that both offer ``CAP_RESUME`` (the reference does) a reset, a stall
that outlasts the link's liveness check or a corrupt chunk makes the sender resume on new
connections and send only what the receiver lacks (SPEC §7.7), so most transfers complete
through faults; what still fails must fail ``failed_clean``, never ``lost``.

The run is bounded in count
(``--transfers``) and time (``--duration-s``: no transfer starts later; each has its
``--deadline-s``, and the APIs their ``--api-timeout-s``). When no transfer ends for
``--stuck-s`` the daemons' links and open transfers and the last faults are written to
the workdir (``stuck_episodes``). After the run both daemons must be alive (``/healthz``)
and serving: a fault-free transfer through the proxy completes bit-exact, on the links as
left, else after one ``reset_all``. The last line printed is one JSON object; the exit
status is 0 iff nothing was corrupted or lost and both daemons are alive and serving.

    .venv/bin/python tools/soak.py --seed 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import re
import shutil
import sys
import tempfile
import time
import urllib.error
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faultproxy import FaultProxy, Schedule
from kvship import Client
from kvship.bench.spawn import DaemonProcess
from kvship.errors import KvshipError, TransferError
from kvship.protocol import LayerSpec

MIB = 1 << 20
DTYPES = ("uint8", "float16", "float32", "int32")
OUTCOMES = ("completed_bitexact", "failed_clean", "failed_unclear", "corrupted", "lost")
CANCEL_WAIT_S = 5.0  # how long a transfer's cancelled tasks get to unwind


# ------------------------------------------------------------------ the data
@dataclass
class Payload:
    request_id: str
    arrays: list[np.ndarray]
    token_ids: list[int]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def layout(self) -> tuple[LayerSpec, ...]:
        return tuple(LayerSpec(a.dtype.name, tuple(a.shape), a.nbytes) for a in self.arrays)


def make_payload(seed: int, index: int, total_bytes: int, n_layers: int) -> Payload:
    """Seeded random layers (sizes 0.5..1.5x the mean, mixed dtypes, so chunks end
    unevenly) and token ids; the same (seed, index) gives the same bytes."""
    rng = np.random.default_rng([seed, index])
    mean = max(4096, total_bytes // n_layers)
    arrays = []
    for _ in range(n_layers):
        dtype = np.dtype(DTYPES[int(rng.integers(len(DTYPES)))])
        nbytes = int(rng.integers(mean // 2, mean * 3 // 2)) // dtype.itemsize * dtype.itemsize
        arrays.append(np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).view(dtype))
    tokens = rng.integers(0, 2**32, int(rng.integers(0, 65)), dtype=np.uint64)
    return Payload(f"soak-{seed}-{index}", arrays, [int(t) for t in tokens])


# -------------------------------------------------------------- one transfer
@dataclass
class Result:
    index: int
    outcome: str = ""
    nbytes: int = 0
    send_error: str | None = None  # "TypeName:CODE"
    recv_error: str | None = None
    messages: list[str] = field(default_factory=list)
    sender_ok: bool = False
    receiver_ok: bool = False
    corruption: str = ""  # a delivered layer differs (or a complete one's metadata)
    metadata: str = ""  # the OPEN the engine was handed differs (token ids, layout)
    seconds: float = 0.0


def error_kind(exc: BaseException) -> str:
    code = exc.code.name if isinstance(exc, TransferError) else ""
    return f"{type(exc).__name__}:{code}" if code else type(exc).__name__


def normalized(message: str) -> str:
    """An error message with ids, numbers and addresses blanked, so alike errors count
    together."""
    message = re.sub(r"soak-\d+-\d+", "<req>", message)
    message = re.sub(r"127\.0\.0\.1:\d+", "<addr>", message)
    message = re.sub(r"\b[0-9a-f]{8,}\b", "<hex>", message)
    message = re.sub(r"\d+(\.\d+)?", "N", message)
    return message[:160]


class Soak:
    def __init__(self, opts: argparse.Namespace, proxy: FaultProxy) -> None:
        self.opts = opts
        self.proxy = proxy
        self.results: list[Result] = []
        self.stuck: list[dict[str, Any]] = []  # watch_stuck's episodes
        self.started = time.monotonic()

    def done(
        self,
        index: int,
        task: asyncio.Task[Result],
        *,
        gate: asyncio.Semaphore,
        running: set[asyncio.Task[Result]],
    ) -> None:
        """A transfer's task ended: free its slot, keep its result (a bug of the soak
        itself is kept too, as ``failed_unclear``, never dropped)."""
        gate.release()
        running.discard(task)
        if task.cancelled() or task.exception() is not None:
            why = "cancelled" if task.cancelled() else repr(task.exception())
            print(f"soak: transfer {index} harness error: {why}", file=sys.stderr)
            self.results.append(Result(index, "failed_unclear", messages=[f"harness: {why}"]))
        else:
            self.results.append(task.result())

    async def receive(
        self, client: Client, payload: Payload, result: Result, timeout: float
    ) -> None:
        """Receive ``payload.request_id`` and check every layer as it is delivered: a
        layer that differs is corruption even if the transfer fails afterwards. The
        OPEN's metadata is checked at once too; it counts as corruption if the transfer
        then completes (see :func:`classify`)."""
        receiver = await client.receive(payload.request_id, timeout=timeout)
        try:
            result.metadata = _metadata_differs(payload, receiver.token_ids, receiver.layout)
            seen: set[int] = set()
            async for layer, array in receiver.layers(copy=False):
                want = payload.arrays[layer] if layer < len(payload.arrays) else None
                if layer in seen:
                    result.corruption = result.corruption or f"layer {layer} delivered twice"
                elif want is None or array.tobytes() != want.tobytes():
                    nbad = _bytes_differing(array, want)
                    result.corruption = result.corruption or f"layer {layer}: {nbad} bytes differ"
                seen.add(layer)
            if len(seen) != len(payload.arrays):
                result.corruption = result.corruption or f"{len(seen)} layers delivered"
            result.receiver_ok = True
        finally:
            await receiver.aclose()

    async def send(self, client: Client, payload: Payload, result: Result, timeout: float) -> None:
        sender = await client.send(
            payload.request_id, payload.layout, peer=self.proxy.address, token_ids=payload.token_ids
        )
        try:
            for i, array in enumerate(payload.arrays):
                await sender.put(i, array)
            await sender.finish(timeout)
            result.sender_ok = True
        except BaseException:
            await sender.abort()
            raise

    async def one(self, index: int, send_client: Client, recv_client: Client) -> Result:
        opts = self.opts
        payload = make_payload(opts.seed, index, int(opts.transfer_mib * MIB), opts.layers)
        result = Result(index, nbytes=payload.nbytes)
        started = time.monotonic()
        api_timeout = opts.api_timeout_s
        receiving = asyncio.create_task(self.receive(recv_client, payload, result, api_timeout))
        await asyncio.sleep(0)  # subscribed first (it may be, it need not be)
        sending = asyncio.create_task(self.send(send_client, payload, result, api_timeout))
        tasks = {"send": sending, "recv": receiving}
        await asyncio.wait(tasks.values(), timeout=opts.deadline_s)
        pending = [name for name, t in tasks.items() if not t.done()]
        for name, task in tasks.items():
            if task.done() and task.exception() is not None:
                exc = task.exception()
                assert exc is not None
                kind = error_kind(exc)
                setattr(result, f"{name}_error", kind)
                clear = "" if isinstance(exc, KvshipError) else "UNCLEAR "
                result.messages.append(f"{name}:{clear}{kind}: {normalized(str(exc))}")
        for name in pending:
            result.messages.append(f"{name}: still waiting at the {opts.deadline_s} s deadline")
            tasks[name].cancel()
        if pending:
            await asyncio.wait([tasks[n] for n in pending], timeout=CANCEL_WAIT_S)
        result.seconds = time.monotonic() - started
        result.outcome = classify(result, tasks)
        return result


def _metadata_differs(
    payload: Payload, token_ids: Sequence[int], layout: Sequence[LayerSpec]
) -> str:
    """What differs between the OPEN the engine was handed and what was sent ("" if
    nothing): the token ids and the layout travel outside every chunk checksum."""
    got = [int(t) for t in token_ids]
    if got != payload.token_ids:
        if len(got) != len(payload.token_ids):
            return f"token ids: sent {len(payload.token_ids)}, got {len(got)}"
        i = next(i for i, (a, b) in enumerate(zip(got, payload.token_ids, strict=True)) if a != b)
        return f"token id {i}: sent {payload.token_ids[i]:#x}, got {got[i]:#x}"
    for i, (a, b) in enumerate(zip(layout, payload.layout, strict=False)):
        if a != b:
            return f"layer {i} spec: sent {b}, got {a}"
    if len(layout) != len(payload.layout):
        return f"layout: sent {len(payload.layout)} layers, got {len(layout)}"
    return ""


def _bytes_differing(array: np.ndarray, want: np.ndarray | None) -> int | str:
    if want is None or array.nbytes != want.nbytes:
        return "all"
    got = np.frombuffer(array.tobytes(), np.uint8)
    return int(np.count_nonzero(got != np.frombuffer(want.tobytes(), np.uint8)))


def classify(result: Result, tasks: dict[str, asyncio.Task[None]]) -> str:
    """The receiver decides: what it was handed (equal or not), else how it ended.

    Differing OPEN metadata (token ids, layout) of a transfer that then fails with a
    kvship error stays ``failed_clean`` (counted apart, ``metadata_corrupted_then_failed``):
    the engine was told it failed. Of a transfer that completes, it is corruption."""
    if result.corruption:
        return "corrupted"
    if result.receiver_ok:
        if result.metadata:
            result.corruption = result.metadata
            return "corrupted"
        return "completed_bitexact"
    errors = [
        t.exception() for t in tasks.values() if t.done() and not t.cancelled() and t.exception()
    ]
    if any(isinstance(e, KvshipError) for e in errors):
        return "failed_clean"
    if errors:
        return "failed_unclear"  # an API raised something that is not a KvshipError
    return "lost"


# ------------------------------------------------------------------ the run
async def run_transfers(
    opts: argparse.Namespace, proxy: FaultProxy, daemons: Sequence[DaemonProcess]
) -> tuple[Soak, dict[str, str | None]]:
    prefill, decode = daemons[0].socket_path, daemons[1].socket_path
    soak = Soak(opts, proxy)
    gate = asyncio.Semaphore(opts.concurrency)
    end_at = soak.started + opts.duration_s
    running: set[asyncio.Task[Result]] = set()
    flapper = asyncio.create_task(flap(proxy, opts.reset_all_every_s))
    reporter = asyncio.create_task(report_progress(soak, proxy, opts))
    watcher = asyncio.create_task(watch_stuck(soak, proxy, daemons, opts, running))
    async with (
        Client(prefill, max_idle=opts.concurrency) as send_client,
        Client(decode, max_idle=opts.concurrency) as recv_client,
    ):
        try:
            for index in range(opts.transfers):
                await gate.acquire()
                if time.monotonic() >= end_at:
                    gate.release()
                    break
                task = asyncio.create_task(soak.one(index, send_client, recv_client))
                running.add(task)
                task.add_done_callback(
                    functools.partial(soak.done, index, gate=gate, running=running)
                )
            if running:
                await asyncio.wait(running, timeout=opts.deadline_s + 2 * CANCEL_WAIT_S + 5)
        finally:
            for helper in (flapper, reporter, watcher):
                helper.cancel()
        proxy.pause_faults()
        final = await final_transfer(opts, proxy, send_client, recv_client)
    return soak, final


async def flap(proxy: FaultProxy, every_s: float) -> None:
    """RST every proxied connection at once, every ``every_s`` s (0: never)."""
    if every_s <= 0:
        return
    while True:
        await asyncio.sleep(every_s)
        proxy.reset_all()


async def report_progress(soak: Soak, proxy: FaultProxy, opts: argparse.Namespace) -> None:
    while True:
        await asyncio.sleep(opts.progress_s)
        counts = Counter(r.outcome for r in soak.results)
        print(
            f"[soak {time.monotonic() - soak.started:6.1f} s] {len(soak.results)} done "
            f"{dict(counts)} faults {proxy.stats()['faults_by_kind']}",
            file=sys.stderr,
            flush=True,
        )


async def watch_stuck(
    soak: Soak,
    proxy: FaultProxy,
    daemons: Sequence[DaemonProcess],
    opts: argparse.Namespace,
    running: set[asyncio.Task[Result]],
) -> None:
    """When no transfer has ended for ``--stuck-s`` while some run, write what both
    daemons and the proxy say (links, open transfers, the last faults) to the workdir,
    once per episode: a wedged link is a finding even if timeouts end it later."""
    last_count, last_change, dumped = 0, time.monotonic(), False
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        if len(soak.results) != last_count or not running:
            last_count, last_change, dumped = len(soak.results), now, False
            continue
        if dumped or now - last_change < opts.stuck_s:
            continue
        dumped = True
        at = round(now - soak.started, 1)
        path = daemons[0].workdir / f"stuck-{at:.0f}s.json"
        state = {
            "at_s": at,
            "idle_s": round(now - last_change, 1),
            "proxy": proxy.stats(),
            "last_faults": [
                [conn, direction, fault.kind, fault.at, fault.bit, fault.ms]
                for conn, direction, fault in list(proxy.events)[-30:]
            ],
        }
        for d in daemons:
            state[d.name] = await asyncio.to_thread(_daemon_state, d)
        path.write_text(json.dumps(state, indent=1))
        soak.stuck.append({"at_s": at, "dump": str(path)})
        print(f"soak: no transfer ended for {opts.stuck_s} s; state in {path}", file=sys.stderr)


def _daemon_state(daemon: DaemonProcess, history: bool = False) -> dict[str, Any]:
    try:
        transfers = daemon.get_json("/v1/transfers")["transfers"]
        return {
            "links": daemon.get_json("/v1/links")["links"],
            "open_transfers": [t for t in transfers if t["state"] in ("open", "received")],
            **({"transfers": transfers} if history else {}),
        }
    except (OSError, ValueError) as exc:
        return {"error": repr(exc)}


async def final_transfer(
    opts: argparse.Namespace, proxy: FaultProxy, send_client: Client, recv_client: Client
) -> dict[str, str | None]:
    """With faults paused, one more transfer through the proxy on the links as the soak
    left them; if that fails, again after :meth:`FaultProxy.reset_all` (fresh links).
    The daemons serve if either completes bit-exact; the first says whether a link was
    left unusable by the faults, even after they stopped."""
    out: dict[str, str | None] = {"same_links": None, "after_reset_all": None}
    for attempt, key in enumerate(out):
        if attempt:
            proxy.reset_all()
            await asyncio.sleep(0.5)
        try:
            result = await Soak(opts, proxy).one(10**9 + attempt, send_client, recv_client)
            outcome = result.outcome
            if result.messages:
                outcome += f": {'; '.join(result.messages)}"
        except Exception as exc:  # reported, not raised
            outcome = f"error: {exc!r}"
        out[key] = outcome
        if outcome == "completed_bitexact":
            break
    return out


def health(daemon: DaemonProcess) -> dict[str, Any]:
    alive = daemon.proc is not None and daemon.proc.poll() is None
    status: Any = None
    try:
        status = daemon.get_json("/healthz").get("status")
        open_transfers = sum(
            1 for t in daemon.get_json("/v1/transfers")["transfers"] if t["state"] == "open"
        )
    except (OSError, urllib.error.URLError, ValueError) as exc:
        status, open_transfers = f"unreachable: {exc}", None
    return {"alive": alive, "healthz": status, "open_transfers": open_transfers}


def log_findings(daemon: DaemonProcess) -> dict[str, Any]:
    """What a daemon's log says: tracebacks (bugs) and its warnings, counted."""
    if daemon.log_path is None or not daemon.log_path.exists():
        return {}
    text = daemon.log_path.read_text(errors="replace")
    levels = Counter(re.findall(r"\b(WARNING|ERROR|CRITICAL)\b", text))
    return {"tracebacks": text.count("Traceback (most recent call last)"), **levels}


def summarize(
    opts: argparse.Namespace,
    soak: Soak,
    proxy: FaultProxy,
    final: dict[str, str | None],
    daemons: Sequence[DaemonProcess],
    wall_s: float,
) -> dict[str, Any]:
    counts = Counter(r.outcome for r in soak.results)
    kinds = Counter(
        f"{side}:{kind}"
        for r in soak.results
        if r.outcome != "completed_bitexact"
        for side, kind in (("send", r.send_error), ("recv", r.recv_error))
        if kind
    )
    messages = Counter(
        m for r in soak.results if r.outcome != "completed_bitexact" for m in r.messages
    )
    stats = proxy.stats()
    checks = {d.name: health(d) for d in daemons}
    with contextlib.suppress(OSError):  # for a post-mortem: each daemon's last 1000 transfers
        post = {d.name: _daemon_state(d, history=True) for d in daemons}
        (daemons[0].workdir / "final-state.json").write_text(json.dumps(post, indent=1))
    alive = all(c["alive"] and c["healthz"] == "ok" for c in checks.values())
    bad = [
        {
            "index": r.index,
            "outcome": r.outcome,
            "corruption": r.corruption or r.metadata,
            "why": r.messages,
        }
        for r in soak.results
        if r.outcome in ("corrupted", "lost", "failed_unclear") or r.metadata
    ]
    return {
        "seed": opts.seed,
        "transfers": len(soak.results),
        **{k: counts.get(k, 0) for k in OUTCOMES},
        "bytes": sum(r.nbytes for r in soak.results if r.outcome == "completed_bitexact"),
        "faults_injected": stats["faults_injected"],
        "faults_by_kind": stats["faults_by_kind"],
        "error_kinds": dict(kinds.most_common()),
        "error_messages": dict(messages.most_common(15)),
        "metadata_corrupted_then_failed": sum(
            1 for r in soak.results if r.metadata and r.outcome != "corrupted"
        ),
        "sender_failed_after_delivery": sum(
            1 for r in soak.results if r.outcome == "completed_bitexact" and not r.sender_ok
        ),
        "proxy": {k: v for k, v in stats.items() if k not in ("faults_injected", "faults_by_kind")},
        "final_transfer": final,
        "serving": "completed_bitexact" in final.values(),
        "daemons": checks,
        "daemons_alive": alive,
        "daemon_logs": {d.name: log_findings(d) for d in daemons},
        "bad_transfers": bad[:20],
        "stuck_episodes": soak.stuck,
        "wall_s": round(wall_s, 1),
        "max_transfer_s": round(max((r.seconds for r in soak.results), default=0.0), 2),
        "settings": {
            k: getattr(opts, k)
            for k in ("transfers", "duration_s", "transfer_mib", "layers", "concurrency",
                      "deadline_s", "api_timeout_s", "reset_all_every_s",
                      "connections_per_peer", "directions")
        } | {"schedule": {k: getattr(opts, k) for k in ("reset", "stall", "truncate", "flip",
                                                        "delay")}},
    }  # fmt: skip


async def amain(
    opts: argparse.Namespace, prefill: DaemonProcess, decode: DaemonProcess
) -> tuple[Soak, FaultProxy, dict[str, str | None]]:
    schedule = Schedule(
        seed=opts.seed,
        reset=opts.reset,
        stall=opts.stall,
        truncate=opts.truncate,
        flip=opts.flip,
        delay=opts.delay,
        directions=tuple(opts.directions.split(",")),
    )
    host, _, port = decode.peer.rpartition(":")
    async with FaultProxy((host, int(port)), schedule) as proxy:
        soak, final = await run_transfers(opts, proxy, (prefill, decode))
        return soak, proxy, final


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--transfers", type=int, default=3000, help="at most this many (default 3000)")
    p.add_argument(
        "--duration-s", type=float, default=150.0, help="no transfer starts later (default 150)"
    )
    p.add_argument("--transfer-mib", type=float, default=8.0, help="mean transfer size (default 8)")
    p.add_argument("--layers", type=int, default=8, help="layers per transfer (default 8)")
    p.add_argument("--concurrency", type=int, default=4, help="transfers at once (default 4)")
    p.add_argument("--deadline-s", type=float, default=60.0, help="per transfer (default 60)")
    p.add_argument(
        "--api-timeout-s",
        type=float,
        default=20.0,
        help="receive(timeout=) and finish(timeout=) (default 20)",
    )
    p.add_argument("--reset", type=float, default=0.0004, help="per segment (default 0.0004)")
    p.add_argument("--stall", type=float, default=0.002, help="per segment (default 0.002)")
    p.add_argument("--truncate", type=float, default=0.0002, help="per segment (default 0.0002)")
    p.add_argument("--flip", type=float, default=0.002, help="per segment (default 0.002)")
    p.add_argument("--delay", type=float, default=0.004, help="per segment (default 0.004)")
    p.add_argument(
        "--connections-per-peer", type=int, default=4, help="the daemons' stripes (default 4)"
    )
    p.add_argument("--directions", default="up,down", help="up (to the receiver), down, or both")
    p.add_argument(
        "--reset-all-every-s", type=float, default=30.0, help="RST every link (0: never)"
    )
    p.add_argument("--progress-s", type=float, default=15.0, help="a progress line on stderr")
    p.add_argument(
        "--stuck-s", type=float, default=10.0, help="no transfer ended this long: dump state"
    )
    p.add_argument("--workdir", help="daemon logs and sockets here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (kept on failure)")
    p.add_argument("--json", action="store_true", help="stdout: only the JSON summary line")
    opts = p.parse_args(argv)
    if opts.transfers < 1 or opts.concurrency < 1 or opts.layers < 1:
        p.error("--transfers, --concurrency and --layers must be >= 1")
    if not 0.01 <= opts.transfer_mib <= 1024:
        p.error("--transfer-mib: 0.01 .. 1024")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="kvship-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    daemon_args = ["--log-level", "info", "--connections-per-peer", str(opts.connections_per_peer)]
    decode = DaemonProcess("decode", workdir, daemon_args)
    prefill = DaemonProcess("prefill", workdir, daemon_args)
    try:
        decode.start()
        prefill.start()
        soak, proxy, final = asyncio.run(amain(opts, prefill, decode))
        summary = summarize(opts, soak, proxy, final, (prefill, decode), time.monotonic() - started)
    except BaseException:
        print(f"soak: aborted; daemon logs in {workdir}", file=sys.stderr)
        raise
    finally:
        codes = {d.name: d.stop(timeout=15) for d in (prefill, decode)}
    ok = bool(
        summary["corrupted"] == 0
        and summary["lost"] == 0
        and summary["daemons_alive"]
        and summary["serving"]
    )
    summary["ok"] = ok
    summary["daemon_exit_codes"] = codes
    keep = not ok or opts.keep or opts.workdir or summary["stuck_episodes"]
    summary["workdir"] = str(workdir) if keep else None
    if not opts.json:
        for key in ("transfers", *OUTCOMES, "bytes", "faults_injected", "wall_s", "ok"):
            print(f"{key:>20}  {summary[key]}")
    print(json.dumps(summary, sort_keys=False))
    if summary["workdir"] is None:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
