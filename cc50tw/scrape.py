"""
Reading a cc50tw server's own view of a benchmark from its ``/metrics``.

Client-side TTFT includes the network and the client; the server's
histogram does not.  Scraping before and after a run and taking the
difference isolates that run, so ``cc50 bench --metrics-url`` can print both
side by side and show where the time goes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import treq
from prometheus_client.parser import text_string_to_metric_families


class HistogramSnapshot(NamedTuple):
    observations: float
    total: float
    buckets: dict[float, float]  # upper bound -> cumulative count

    def since(self, earlier: HistogramSnapshot) -> HistogramSnapshot:
        return HistogramSnapshot(
            self.observations - earlier.observations,
            self.total - earlier.total,
            {bound: n - earlier.buckets.get(bound, 0.0) for bound, n in self.buckets.items()},
        )

    @property
    def mean(self) -> float:
        return self.total / self.observations if self.observations else float("nan")

    def quantile(self, q: float) -> float:
        """Estimate by linear interpolation inside the bucket, as PromQL's histogram_quantile does."""
        if not self.observations:
            return float("nan")
        rank = q * self.observations
        previous_bound, previous_count = 0.0, 0.0
        for bound, cumulative in sorted(self.buckets.items()):
            if cumulative >= rank:
                if bound == float("inf"):
                    return previous_bound
                inside = cumulative - previous_count
                fraction = (rank - previous_count) / inside if inside else 0.0
                return previous_bound + (bound - previous_bound) * fraction
            previous_bound, previous_count = bound, cumulative
        return previous_bound


def parse_histogram(text: str, name: str) -> HistogramSnapshot:
    count = total = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == name + "_count":
                count = sample.value
            elif sample.name == name + "_sum":
                total = sample.value
            elif sample.name == name + "_bucket":
                buckets[float(sample.labels["le"])] = sample.value
    return HistogramSnapshot(count, total, buckets)


async def scrape(url: str, reactor: Any = None) -> str:
    response = await treq.get(url, timeout=10, reactor=reactor) if reactor is not None else await treq.get(url, timeout=10)
    if response.code != 200:
        raise RuntimeError(f"{url} answered HTTP {response.code}")
    return str(await response.text("utf-8"))
