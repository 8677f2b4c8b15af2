"""
``cc50tw.metrics``'s per-request series are plain numbers exported at scrape
time; they must read exactly as ``prometheus_client``'s own Counter and
Histogram would, fed the same figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.metrics import LATENCY_BUCKETS, PlainCounter, PlainHistogram


class _Plain(Collector):
    def __init__(self, *series: PlainCounter | PlainHistogram) -> None:
        self.series = series

    def collect(self):  # type: ignore[no-untyped-def]
        for one in self.series:
            yield one.family(True)


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample but the ``_created`` times, which differ by when each was made."""
    return [
        (s.name, s.labels, s.value)
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    ]


def createdNames(registry: CollectorRegistry) -> list[tuple[str, dict[str, str]]]:
    return [(s.name, s.labels) for metric in registry.collect() for s in metric.samples if s.name.endswith("_created")]


class PlainSeriesTests(SynchronousTestCase):
    def test_asPrometheusClientWouldExportThem(self) -> None:
        observations = [0.0, 0.0001, 0.00010001, 0.001, 0.3, 1, 59.9, 60, 61, 1e9, -1.0]
        reference = CollectorRegistry()
        histogram = Histogram("h_seconds", "A histogram.", buckets=LATENCY_BUCKETS, registry=reference)
        labelled = Counter("c", "A labelled counter.", ["a", "b"], registry=reference)
        plain = Counter("n", "A counter.", registry=reference)
        ours = CollectorRegistry()
        oursHistogram = PlainHistogram("h_seconds", "A histogram.", LATENCY_BUCKETS)
        oursLabelled = PlainCounter("c", "A labelled counter.", ("a", "b"))
        oursPlain = PlainCounter("n", "A counter.")
        ours.register(_Plain(oursHistogram, oursLabelled, oursPlain))
        for value in observations:
            histogram.observe(value)
            oursHistogram.observe(value)
        for labels, amount in [(("x", "y"), 1), (("x", "z"), 2), (("x", "y"), 3)]:
            labelled.labels(*labels).inc(amount)
            oursLabelled.inc(labels, amount)
        plain.inc(5)
        oursPlain.inc((), 5)
        self.assertEqual(samples(ours), samples(reference))
        self.assertEqual(createdNames(ours), createdNames(reference))

    def test_bucketBoundsAreInclusive(self) -> None:
        histogram = PlainHistogram("h", "", (0.001, 0.01))
        histogram.observe(0.001)
        histogram.observe(0.0010001)
        self.assertEqual(histogram.counts, [1, 1, 0])

    def test_labelledChildAppearsWithItsFirstCount(self) -> None:
        counter = PlainCounter("c", "", ("outcome",))
        self.assertEqual(list(counter.family(True).samples), [])
        counter.inc(("done",))
        self.assertEqual([(s.name, s.labels, s.value) for s in counter.family(False).samples], [("c_total", {"outcome": "done"}, 1.0)])

    def test_createdSeriesFollowPrometheusClientsSwitch(self) -> None:
        """
        With prometheus_client's ``_created`` series switched off
        (``disable_created_metrics``, or PROMETHEUS_DISABLE_CREATED_SERIES),
        ours are off too, as its own are; this reads a private flag of
        prometheus_client, so a rename there fails here, not in production.
        """
        from prometheus_client import disable_created_metrics, enable_created_metrics

        from cc50tw.metrics import _exportCreated

        self.assertTrue(_exportCreated())
        disable_created_metrics()
        self.addCleanup(enable_created_metrics)
        self.assertFalse(_exportCreated())
        reference = CollectorRegistry()
        Counter("n", "A counter.", registry=reference).inc()
        plain = PlainCounter("n", "A counter.")
        plain.inc((), 1)
        self.assertEqual(createdNames(reference), [])
        self.assertEqual(createdNames(_exportingAsServed(plain)), [])


def _exportingAsServed(*series: PlainCounter | PlainHistogram) -> CollectorRegistry:
    """A registry exporting ``series`` with the server's own decision on ``_created``."""
    from cc50tw.metrics import _exportCreated

    class Served(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            for one in series:
                yield one.family(_exportCreated())

    registry = CollectorRegistry()
    registry.register(Served())
    return registry
