"""`make bench`: the same load, directly against the fake upstream and through sserelay,
in one run, so the difference is what sserelay adds on this machine today.

Scenarios (see `bench/scenarios.py`): 1 sequential, 2 concurrent, 3 saturation,
4 open streams, 5 limiter, 6 resumable vs direct (from 2 and 3), 7 api_workers (the
other topology: `serve --api-only` and two `worker`s, resumable, 1 and 2's loads). A full
run repeats the set three times and reports medians; `--quick` runs each once, smaller,
in under two minutes. Output: tables on stdout, `bench/results/latest.json`, and a PNG of the TTFT
distributions (`bench/results/ttft_cdf.png`).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import uvloop

from . import report, scenarios
from .harness import ROOT, Harness, describe_machine, raise_fd_limit

SCENARIOS = (
    "sequential",
    "burst",
    "concurrent",
    "realistic",
    "saturation",
    "open_streams",
    "limiter",
    "api_workers",
)


async def one_run(
    args: argparse.Namespace, sizes: scenarios.Sizes, fd_limit: int, ttfts: dict[str, Any]
) -> report.Results:
    harness = Harness(
        args.out.parent / "logs",
        redis=True,
        relay_workers=args.relay_workers,
        server=args.server,
    )
    harness.start()
    # The generator's own full collections would show up as latency on every path.
    gc.collect()
    gc.freeze()
    results: report.Results = {}
    try:
        for name in args.scenarios:
            started = time.perf_counter()
            if name == "open_streams":
                measured = await scenarios.open_streams(harness, sizes, fd_limit)
            else:
                measured = await getattr(scenarios, name)(harness, sizes)
            # A scenario measures one table, or several (named) on one set of processes.
            parts = measured if isinstance(measured, dict) else {name: measured}
            for part, each in parts.items():
                results[part] = each.figures
                for path, values in each.ttfts.items():
                    ttfts.setdefault(part, {}).setdefault(path, []).extend(values)
            print(f"  {name} done in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        harness.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller, one run (< 2 minutes)")
    parser.add_argument("--runs", type=int, help="repetitions to take medians of (default 3)")
    parser.add_argument(
        "--scenario",
        dest="scenarios",
        action="append",
        choices=SCENARIOS,
        help="run only these (repeatable)",
    )
    parser.add_argument(
        "--relay-workers",
        type=int,
        default=1,
        help="run sserelay as `serve --workers N` (N processes; CPU and RSS summed)",
    )
    parser.add_argument(
        "--server",
        choices=("uvicorn", "granian"),
        default="uvicorn",
        help="the ASGI server in front of sserelay's app (granian comes with the bench extra)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios or list(SCENARIOS)
    runs = args.runs or (1 if args.quick else 3)
    sizes = scenarios.Sizes.quick() if args.quick else scenarios.Sizes()
    fd_limit = raise_fd_limit()
    started = time.perf_counter()
    all_runs: list[report.Results] = []
    ttfts: dict[str, Any] = {}
    for i in range(runs):
        print(f"run {i + 1} of {runs}", flush=True)
        # uvloop, as sserelay runs: the load generator must cost less than what it measures.
        all_runs.append(uvloop.run(one_run(args, sizes, fd_limit, ttfts)))
    results = report.median_of(all_runs)
    duration = time.perf_counter() - started
    print(report.table(results))
    png = report.chart(ttfts, args.out.with_name("ttft_cdf.png"))
    load_png = report.load_chart(results, args.out.with_name("load.png"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "duration_s": round(duration, 1),
                "quick": args.quick,
                "runs": runs,
                "machine": describe_machine(),
                "open_files_hard_limit": fd_limit,
                "relay_workers": args.relay_workers,
                "server": args.server,
                "budget": report.budget_rows(results),
                "round_two": report.budget_rows(results, report.ROUND_TWO),
                "results": results,
                "each_run": all_runs,
                "ttft_s": ttfts,  # every sample the chart shows, to redraw or compare
            },
            indent=2,
        )
    )
    charts = " and ".join(str(p) for p in (png, load_png) if p)
    print(f"\nwrote {args.out} and " + (charts or "no PNG (pip install '.[bench]')"))
    print(f"duration {duration:.0f} s ({runs} run{'s' if runs > 1 else ''})")


if __name__ == "__main__":
    main()
