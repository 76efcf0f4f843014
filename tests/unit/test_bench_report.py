"""The bench's summary arithmetic: medians over runs and the budget verdicts."""

from __future__ import annotations

import math

from bench.report import ROUND_TWO, budget_rows, median_of, table


def _run(added_p50: float, intact: bool, tokens_per_cpu_s: int) -> dict:
    return {
        "sequential": {
            "direct": {"added_p50_ms": added_p50, "added_p99_ms": 2.0, "intact": intact}
        },
        "saturation": {
            "direct": {"tokens_per_cpu_s": tokens_per_cpu_s, "levels": [{"c": 1}]},
            "resumable": {"tokens_per_cpu_s": float("nan")},
        },
    }


def test_median_per_figure_and_flags_hold_only_if_they_held_in_every_run() -> None:
    merged = median_of(
        [_run(0.5, True, 90_000), _run(3.0, True, 120_000), _run(0.9, False, 110_000)]
    )
    direct = merged["sequential"]["direct"]
    assert direct["added_p50_ms"] == 0.9
    assert direct["intact"] is False
    assert merged["saturation"]["direct"]["tokens_per_cpu_s"] == 110_000
    assert merged["saturation"]["direct"]["levels"] == [{"c": 1}]  # detail from the last run
    assert math.isnan(merged["saturation"]["resumable"]["tokens_per_cpu_s"])


def test_budget_verdicts_and_missing_figures() -> None:
    rows = {r["figure"]: r for r in budget_rows(median_of([_run(0.9, True, 120_000)]))}
    assert rows["added time to first delta, single stream"]["met"] is True
    assert rows["relayed tokens/s, one process, direct"]["met"] is True
    # Not measured in this run: reported as missed, never as met.
    assert rows["relayed tokens/s, one process, resumable (Redis)"]["met"] is False
    assert rows["RSS per open idle stream"]["met"] is False
    rows = {r["figure"]: r for r in budget_rows(median_of([_run(1.5, True, 80_000)]))}
    assert rows["added time to first delta, single stream"]["met"] is False
    assert rows["relayed tokens/s, one process, direct"]["met"] is False
    assert "MISSED" in table(median_of([_run(1.5, True, 80_000)]))


def test_round_two_verdicts_need_both_routes_and_the_full_load() -> None:
    run = {
        "sequential": {
            "direct": {"sserelay_cpu_ms_per_stream": 0.3, "added_p50_ms": 0.4},
            "resumable": {"sserelay_cpu_ms_per_stream": 0.9, "added_p50_ms": 1.0},
        },
        "realistic": {
            "resumable": {"in_flight": 250, "added_p99_ms": 10.0, "intact": True},
        },
    }
    rows = {r["figure"]: r for r in budget_rows(median_of([run]), ROUND_TWO)}
    cpu = rows["CPU per 20-token stream (its start and 20 events), direct / resumable"]
    assert cpu["met"] is False and cpu["measured"] == "0.30 / 0.90"
    assert rows["added TTFT p50, one stream at a time, direct / resumable"]["met"] is True
    # Met at 250 streams is not met at 1,000.
    assert rows["1,000 resumable streams at 50 tok/s, one process"]["met"] is False
    assert rows["limiter p99 at a steady 10,000 decisions/s"]["met"] is False  # not measured
    assert "round two" in table(median_of([run]))
