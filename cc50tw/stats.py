"""
Latency summaries, in the C++ CC50 client's format as well as our own.

People compare cc50tw against the C++ tools by diffing the last line of a
bench run, so ``cpp_summary_line`` must keep exactly that shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class Summary(NamedTuple):
    samples: int
    mean: float
    p50: float
    p95: float
    p99: float
    minimum: float
    maximum: float


def percentile(sorted_values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(percent / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: Sequence[float]) -> Summary:
    ordered = sorted(values)
    if not ordered:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Summary(
        samples=len(ordered),
        mean=sum(ordered) / len(ordered),
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        minimum=ordered[0],
        maximum=ordered[-1],
    )


def cpp_summary_line(latencies_ms: Sequence[float]) -> str:
    """``iters=N mean_ms=X p50_ms=X p95_ms=X p99_ms=X``, as the C++ client prints it."""
    s = summarize(latencies_ms)
    return f"iters={s.samples} mean_ms={s.mean:.3f} p50_ms={s.p50:.3f} p95_ms={s.p95:.3f} p99_ms={s.p99:.3f}"


def describe(label: str, values_ms: Sequence[float]) -> str:
    s = summarize(values_ms)
    return (
        f"{label:<12} mean={s.mean:.3f} p50={s.p50:.3f} p95={s.p95:.3f} p99={s.p99:.3f} "
        f"min={s.minimum:.3f} max={s.maximum:.3f} (ms)"
    )
