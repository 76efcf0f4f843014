"""What a run prints and writes: the budget table, per-scenario tables, JSON, a PNG."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Results = dict[str, dict[str, dict[str, Any]]]  # scenario -> path -> figure -> value


def median_of(runs: Sequence[Results]) -> Results:
    """Every numeric figure's median over the runs; a flag holds only if it held in all."""

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, bool):
            return all(values)
        if isinstance(first, int | float) and all(isinstance(v, int | float) for v in values):
            numbers = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            if not numbers:
                return float("nan")
            middle = statistics.median(numbers)
            return round(middle, 4) if isinstance(middle, float) else middle
        if isinstance(first, dict):
            keys = [k for k in first if all(isinstance(v, dict) and k in v for v in values)]
            return {k: merge([v[k] for v in values]) for k in keys}
        return values[-1]  # lists (per-level detail) are kept from the last run

    merged: Results = merge(list(runs))
    return merged


@dataclass(frozen=True)
class Target:
    figure: str
    target: str
    measured: Callable[[Results], str]
    met: Callable[[Results], bool]


def _get(results: Results, scenario: str, path: str, figure: str) -> Any:
    return results.get(scenario, {}).get(path, {}).get(figure, float("nan"))


def _added_ttft(figure: str, scenario: str, p50_ms: float, p99_ms: float, note: str) -> Target:
    def added(r: Results, q: str) -> Any:
        return _get(r, scenario, "direct", f"added_{q}_ms")

    return Target(
        figure,
        f"p50 <= {p50_ms:g} ms, p99 <= {p99_ms:g} ms{note}",
        lambda r: (
            f"p50 {added(r, 'p50'):+.2f} ms, p99 {added(r, 'p99'):+.2f} ms"
            + (f" (at {_get(r, scenario, 'direct', 'in_flight')})" if note else "")
        ),
        lambda r: added(r, "p50") <= p50_ms and added(r, "p99") <= p99_ms,
    )


BUDGET = (
    _added_ttft("added time to first delta, single stream", "sequential", 1, 3, ""),
    _added_ttft("added TTFT, concurrent streams in flight", "concurrent", 2, 10, " (at 500)"),
    Target(
        "relayed tokens/s, one process, direct",
        ">= 100,000",
        lambda r: (
            f"{_get(r, 'saturation', 'direct', 'tokens_per_s'):,.0f} on this box; "
            f"{_get(r, 'saturation', 'direct', 'tokens_per_cpu_s'):,.0f} per CPU-second"
        ),
        lambda r: _get(r, "saturation", "direct", "tokens_per_cpu_s") >= 100_000,
    ),
    Target(
        "relayed tokens/s, one process, resumable (Redis)",
        ">= 50,000",
        lambda r: (
            f"{_get(r, 'saturation', 'resumable', 'tokens_per_s'):,.0f} on this box; "
            f"{_get(r, 'saturation', 'resumable', 'tokens_per_cpu_s'):,.0f} per CPU-second"
        ),
        lambda r: _get(r, "saturation", "resumable", "tokens_per_cpu_s") >= 50_000,
    ),
    Target(
        "RSS per open idle stream",
        "<= 30 KB at 10,000",
        lambda r: (
            f"{_get(r, 'open_streams', 'max', 'rss_per_stream_kb'):.1f} KB "
            f"at {_get(r, 'open_streams', 'max', 'streams'):,}"
        ),
        lambda r: _get(r, "open_streams", "max", "rss_per_stream_kb") <= 30,
    ),
    Target(
        "limiter admissions/s, one process, Redis",
        ">= 10,000, p99 < 1 ms",
        lambda r: (
            f"{_get(r, 'limiter', 'redis', 'admissions_per_s'):,.0f}/s flat out "
            f"({_get(r, 'limiter', 'redis', 'admissions_with_settlement_per_s'):,.0f}/s with "
            f"settlement); p99 {_get(r, 'limiter', 'redis', 'decision_p99_ms'):.2f} ms at "
            f"{_get(r, 'limiter', 'redis', 'at_10k_per_s_achieved'):,.0f}/s"
        ),
        lambda r: (
            _get(r, "limiter", "redis", "admissions_per_s") >= 10_000
            and _get(r, "limiter", "redis", "decision_p99_ms") < 1
        ),
    ),
)


def _pair(scenario: str, figure: str, fmt: str) -> Callable[[Results], str]:
    def measured(r: Results) -> str:
        direct, resumable = (_get(r, scenario, p, figure) for p in ("direct", "resumable"))
        return f"{direct:{fmt}} / {resumable:{fmt}}"

    return measured


def _both(scenario: str, figure: str, direct: float, resumable: float) -> Callable[[Results], bool]:
    return lambda r: (
        _get(r, scenario, "direct", figure) <= direct
        and _get(r, scenario, "resumable", figure) <= resumable
    )


def _realistic_top(r: Results) -> str:
    top = r.get("realistic", {}).get("resumable", {})
    return (
        f"p99 {top.get('added_p99_ms', float('nan')):+.1f} ms at {top.get('in_flight')} x 50 "
        f"tok/s, intact: {'yes' if top.get('intact') else 'NO'}"
    )


ROUND_TWO = (
    Target(
        "CPU per 20-token stream (its start and 20 events), direct / resumable",
        "<= 0.4 / <= 0.7 ms (for a start alone)",
        _pair("sequential", "sserelay_cpu_ms_per_stream", ".2f"),
        _both("sequential", "sserelay_cpu_ms_per_stream", 0.4, 0.7),
    ),
    Target(
        "added TTFT p50, one stream at a time, direct / resumable",
        "<= 0.5 / <= 1.5 ms",
        _pair("sequential", "added_p50_ms", "+.2f"),
        _both("sequential", "added_p50_ms", 0.5, 1.5),
    ),
    Target(
        "added TTFT p50, burst of 100 starts, direct / resumable",
        "<= 40 / <= 80 ms",
        _pair("burst", "added_p50_ms", "+.1f"),
        _both("burst", "added_p50_ms", 40, 80),
    ),
    Target(
        "CPU per text event at 50 tok/s, top load, direct / resumable",
        "<= 20 / <= 35 us",
        _pair("realistic", "sserelay_cpu_us_per_event", ".0f"),
        _both("realistic", "sserelay_cpu_us_per_event", 20, 35),
    ),
    Target(
        "1,000 resumable streams at 50 tok/s, one process",
        "added TTFT p99 <= 25 ms, intact",
        _realistic_top,
        lambda r: (
            _get(r, "realistic", "resumable", "in_flight") >= 1000
            and _get(r, "realistic", "resumable", "added_p99_ms") <= 25
            and _get(r, "realistic", "resumable", "intact") is True
        ),
    ),
    Target(
        "RSS per open idle stream",
        "<= 20 KB",
        lambda r: f"{_get(r, 'open_streams', 'max', 'rss_per_stream_kb'):.1f} KB",
        lambda r: _get(r, "open_streams", "max", "rss_per_stream_kb") <= 20,
    ),
    Target(
        "limiter p99 at a steady 10,000 decisions/s",
        "<= 1 ms",
        lambda r: f"{_get(r, 'limiter', 'redis', 'decision_p99_ms'):.2f} ms",
        lambda r: _get(r, "limiter", "redis", "decision_p99_ms") <= 1,
    ),
)
"""The second round's targets (per stream and per event, at real token rates)."""


def budget_rows(results: Results, targets: Sequence[Target] = BUDGET) -> list[dict[str, Any]]:
    rows = []
    for target in targets:
        try:
            measured, met = target.measured(results), bool(target.met(results))
        except (TypeError, ValueError):
            measured, met = "not measured", False
        rows.append(
            {"figure": target.figure, "target": target.target, "measured": measured, "met": met}
        )
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: Results) -> str:
    lines = []
    for title, targets in (("budget", BUDGET), ("round two", ROUND_TWO)):
        lines += ["", title]
        for row in budget_rows(results, targets):
            mark = "met" if row["met"] else "MISSED"
            lines.append(f"  {row['figure']:<50} {row['target']:<36} {row['measured']}  [{mark}]")
    for scenario, paths in results.items():
        lines += ["", scenario]
        for path, figures in paths.items():
            shown = ", ".join(
                f"{k}={_fmt(v)}" for k, v in figures.items() if not isinstance(v, list | dict)
            )
            lines.append(f"  {path:<10} {shown}")
    return "\n".join(lines)


def chart(ttfts: dict[str, dict[str, list[float]]], out: Path) -> Path | None:
    """Latency CDFs, direct vs sserelay, one panel per scenario. None if there is nothing
    to draw or matplotlib is missing (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return None
    scenarios = [s for s in ("sequential", "burst", "concurrent") if ttfts.get(s)]
    if not scenarios:
        return None
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.2), squeeze=False)
    labels = {
        "upstream": "upstream directly",
        "direct": "via sserelay (POST /v1/chat/stream)",
        "resumable": "via sserelay, resumable (Redis log)",
        "openai": "via sserelay (POST /v1/chat/completions)",
    }
    titles = {
        "sequential": "one stream at a time",
        "burst": "100 streams started at once, new connections",
        "concurrent": "streams started while many are in flight",
    }
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        for path, values in ttfts[scenario].items():
            xs = sorted(v * 1000 for v in values if not math.isnan(v))
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=labels.get(path, path))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{v:g}" if v < 1000 else f"{v / 1000:g}k")
        )
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("time to first text (ms, log scale)")
        ax.set_ylabel("fraction of streams")
        ax.set_title(titles.get(scenario, scenario))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def load_chart(results: Results, out: Path) -> Path | None:
    """The realistic scenario over load: text events delivered per second, and
    sserelay's CPU, against the streams in flight (50 tokens/s each), one line per path.
    None without that scenario or matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    paths = results.get("realistic")
    if not paths:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.2))
    panels = (
        ("text_events_per_s", "text events delivered per second", False),
        ("tokens_per_event", "tokens per text event (coalescing)", False),
        ("sserelay_cpu_util", "sserelay CPU (share of one core)", False),
        ("ttft_p99_ms", "time to first text, p99 (ms, log scale)", True),
    )
    for ax, (figure, title, log) in zip(axes, panels, strict=True):
        for path, figures in paths.items():
            levels = [lv for lv in figures.get("levels") or [] if lv.get(figure) is not None]
            if levels:
                xs = [lv["in_flight"] for lv in levels]
                color = f"C{list(paths).index(path)}"  # one colour per path in every panel
                ax.plot(xs, [lv[figure] for lv in levels], marker="o", label=path, color=color)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("streams in flight, 50 tokens/s each (Poisson arrivals)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
