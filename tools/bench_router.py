"""Median µs per ``Router.decide`` with link figures read from an in-memory dict.

Per request the caller parses nothing and fetches nothing: it builds a LinkView from the
figures dict it already holds (as a daemon-side POST /v1/route handler would) and decides.
Re-tunes happen on schedule inside the loop, so their amortised cost is in the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from kvship.plan import load_profile, optimize
from kvship.router import LinkView, RemoteView, RouteRequest
from kvship.router.scenario import router_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--decisions", type=int, default=100_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    profile = load_profile("prfaas-case-study")
    point = optimize(profile, "prfaas")
    router = router_for(profile, "prfaas", point.t_tokens, point.n_prefill_local)
    prompt, _ = profile.workload.lengths.sample(np.random.default_rng(0), args.decisions)
    figures = {"rate_limit_Bps": 12.5e9, "wire_Bps": 2e9, "queue_wait_s": 0.01, "connections": 4}
    remote = RemoteView(3)
    lengths = [int(n) for n in prompt]
    samples = []
    clock = time.perf_counter_ns
    for n in lengths:
        t0 = clock()
        figures["at"] = now = time.time()
        link = LinkView.from_figures(figures, now)
        router.decide(RouteRequest(n, 0, 0), link, remote)
        samples.append(clock() - t0)
    samples.sort()
    out = {
        "decisions": len(samples),
        "median_us": statistics.median(samples) / 1e3,
        "p99_us": samples[int(0.99 * len(samples))] / 1e3,
        "max_us": samples[-1] / 1e3,
        "mean_us": sum(samples) / len(samples) / 1e3,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            ", ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()
            )
        )


if __name__ == "__main__":
    main()
