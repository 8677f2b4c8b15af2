"""
A real HAProxy (Debian's ``haproxy``) in front of two real ``twistd cc50``
instances, on the configuration shipped in ``examples/haproxy/haproxy.cfg``
(issue 17): TCP mode, ``send-proxy-v2`` into ``--listen=haproxy:tcp:...``,
health checks on each instance's ``/readyz``.

- the instances' logs name the real clients (PROXY v2), and both get traffic;
- a rolling restart under streaming load over many connections loses no
  request and answers none twice: SIGTERM one instance, restart it, then the
  other, while ``ClientPool`` retries what a draining server refused.

Without haproxy these tests skip, saying why; under ``CI=true`` they fail,
so CI never loses them silently (as ``require_llama_server`` does).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from cc50tw.client import CC50ClientProtocol, ClientPool, RetryPolicy, connect
from tests.conftest import CC50Launcher
from tests.haproxy_support import HAProxy, Instance, find_haproxy, haproxy_for, new_instance
from tests.helpers import ServerProcess

HAPROXY_BINARY, HAPROXY_MISSING = find_haproxy()

#: The toy backend with some work per token, so requests stream for a while
#: and a drain has requests in flight to finish.
INSTANCE_ARGS = ("--toy-iters=200", "--drain-timeout=20")
#: One request log line: ``request 7 from 127.0.0.1:50312: done backend=toy ...``.
REQUEST_LINE = re.compile(r"request \d+ from ([0-9.]+):(\d+): (\w+) ")


def require_haproxy() -> Path:
    """haproxy's path; skips (fails, under CI) without it."""
    if HAPROXY_BINARY is not None:
        return HAPROXY_BINARY
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the HAProxy tests, but: {HAPROXY_MISSING}", pytrace=False)
    pytest.skip(HAPROXY_MISSING)


class Cluster:
    """Two instances and the HAProxy in front of them; restarts keep each instance's ports."""

    def __init__(self, launcher: CC50Launcher, binary: Path, directory: Path) -> None:
        self.launcher = launcher
        self.instances: dict[str, Instance] = {"cc50-a": new_instance(), "cc50-b": new_instance()}
        self.processes: dict[str, list[ServerProcess]] = {name: [] for name in self.instances}
        for name in self.instances:
            self.start(name)
        self.haproxy: HAProxy = haproxy_for(binary, list(self.instances.values()), directory)
        self.haproxy.start()
        self.haproxy.wait_for({"cc50-a": "UP", "cc50-b": "UP"})

    def start(self, name: str) -> ServerProcess:
        instance = self.instances[name]
        process = self.launcher.start(
            instance.metrics, *INSTANCE_ARGS, port=instance.port, listen=instance.listen
        )
        self.processes[name].append(process)
        return process

    def stopAndCheck(self, name: str) -> ServerProcess:
        """SIGTERM the instance's current process; it must drain and exit 0 with a clean log (blocking)."""
        process = self.processes[name][-1]
        status = process.stop(timeout=30)
        assert status == 0, f"{name} exited {status}\n{process.log_tail()}"
        assert not process.log_problems(), process.log_problems()[:5]
        assert "stopped listening; draining" in process.log()
        return process

    def logs(self) -> list[ServerProcess]:
        return [process for processes in self.processes.values() for process in processes]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    binary = require_haproxy()
    launcher = CC50Launcher(tmp_path)
    built: list[Cluster] = []
    try:
        built.append(Cluster(launcher, binary, tmp_path))
        yield built[0]
    finally:
        if built and built[0].haproxy.process is not None:
            built[0].haproxy.stop()
        launcher.stop_all()


def requestLines(process: ServerProcess) -> list[tuple[int, str]]:
    """(client port, outcome) of every request line in an instance's log."""
    return [(int(m.group(2)), m.group(3)) for m in REQUEST_LINE.finditer(process.log())]


class PortRecorder:
    """A ``ClientPool`` connector that remembers each connection's local port: the client's real address."""

    def __init__(self, reactor: Any, endpoint: str) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.ports: set[int] = set()

    async def __call__(self, address: str) -> CC50ClientProtocol:
        client = await connect(self.reactor, address, timeout=5)
        self.ports.add(client.transport.getHost().port)  # type: ignore[union-attr]
        return client


def assertRealClients(logged: set[int], clients: set[int]) -> None:
    """The ports in the instances' request lines are the clients' own (PROXY v2), not HAProxy's."""
    assert logged <= clients, f"logged {sorted(logged)[:4]}..., clients {sorted(clients)[:4]}..."


@pytest_twisted.ensureDeferred
async def test_realClientAddressesThroughHAProxy(cluster: Cluster) -> None:
    """Requests through HAProxy reach both instances, whose logs name the client's own port, not HAProxy's."""
    from twisted.internet import reactor

    recorder = PortRecorder(reactor, cluster.haproxy.endpoint)
    pool = ClientPool(reactor, cluster.haproxy.endpoint, connections=8, connector=recorder)
    try:
        results = await DeferredList(
            [Deferred.fromCoroutine(pool.infer(f"hello {n}", 8)) for n in range(32)], fireOnOneErrback=True
        )
    finally:
        await pool.close()
    assert all(completion.stats.tokens == 8 for _, completion in results)
    for name in cluster.instances:  # their logs complete
        await deferToThread(cluster.stopAndCheck, name)
    assert len(recorder.ports) == 8
    for process in cluster.logs():
        lines = requestLines(process)
        assert lines, f"no request reached {process.address}: leastconn should spread 8 connections"
        assert {port for port, _ in lines} <= recorder.ports, (lines, recorder.ports)


@pytest_twisted.ensureDeferred
async def test_rollingRestartLosesNothing(cluster: Cluster) -> None:
    """
    Streaming load over 16 connections through HAProxy while each instance
    in turn is SIGTERMed, drained and restarted: every request ends in DONE
    (directly or after the pool's retry), none is lost, and the instances'
    logs hold exactly one ``done`` per request, under the clients' own ports.
    """
    from twisted.internet import reactor

    recorder = PortRecorder(reactor, cluster.haproxy.endpoint)
    pool = ClientPool(
        reactor,
        cluster.haproxy.endpoint,
        connections=16,
        connector=recorder,
        policy=RetryPolicy(attempts=10, initialDelay=0.05, maxDelay=1.0),
    )
    tokens = 64
    issued = 0
    answered: dict[int, int] = {}
    failures: list[str] = []
    running = True

    async def worker() -> None:
        nonlocal issued
        while running:
            number = issued
            issued += 1
            try:
                completion = await pool.infer(f"request {number}", tokens, timeout=30)
            except Exception as e:
                failures.append(f"request {number}: {e!r}")
                continue
            assert completion.stats.tokens == tokens and len(completion.text) > 0
            answered[number] = answered.get(number, 0) + 1

    async def pause(seconds: float) -> None:
        await deferLater(reactor, seconds, lambda: None)

    workers = [Deferred.fromCoroutine(worker()) for _ in range(48)]
    started = time.monotonic()
    try:
        await pause(1.5)
        for name in ("cc50-a", "cc50-b"):
            before = len(answered)
            await deferToThread(cluster.stopAndCheck, name)
            await deferToThread(cluster.start, name)
            await deferToThread(cluster.haproxy.wait_for, {name: "UP"})
            await pause(1.5)
            assert len(answered) > before, f"no request answered while {name} restarted"
    finally:
        running = False
        await DeferredList(workers)
        await pool.close()
    elapsed = time.monotonic() - started

    assert failures == [], failures[:5]
    assert sorted(answered) == list(range(issued)), "a request was lost"
    assert set(answered.values()) == {1}
    # The server side, once every log is complete (the instances stopped): one
    # done per request over the four processes, none answered twice.
    for name in cluster.instances:
        await deferToThread(cluster.stopAndCheck, name)
    done = [line for process in cluster.logs() for line in requestLines(process) if line[1] == "done"]
    assert len(done) == issued, (len(done), issued)
    # Each process served requests, but the last one restarted: connections
    # stay where they are, so it gets only new ones, and the pool opens new
    # ones only in place of those a drain retired (docs/scaling.md, "Limits").
    a1, a2, b1, b2 = cluster.processes["cc50-a"] + cluster.processes["cc50-b"]
    for process in (a1, b1, a2):
        assert any(outcome == "done" for _, outcome in requestLines(process)), f"{process.address} served nothing"
    print(
        f"\nrolling restart: {issued} requests x {tokens} tokens in {elapsed:.1f}s over {len(recorder.ports)} "
        f"connections; {pool.retries} retries ({pool.retriedRequests} requests), 0 lost, 0 answered twice"
    )
    assertRealClients({port for port, _ in done}, recorder.ports)
