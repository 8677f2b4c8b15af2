"""
The upstream error taxonomy, end to end: a real ``twistd cc50`` in front of
fake upstreams (``tests/fake_upstream.py``, served on real sockets by the
pytest-twisted reactor) that play each failure, in each dialect.

Every row of the taxonomy (docs/backends.md) says, for one upstream
condition: the CC50 code the client gets (its message carrying the
upstream's own reason, here a unique marker the fake sent), whether the
request moves to the other upstream of a pool of two (only before any text
reached the client, and once: two POSTs in all, never more), and whether the
condition counts against the upstream's health (``cc50_upstream_backoffs_total``
on the server's ``/metrics``): no upstream is marked down by an error its
request caused.

Fronts (``FRONTS``): ``--backend=llama_server --llama-endpoint=PATH`` for
each of the three dialects, and ``--backend=openai [--openai-chat]`` for the
two OpenAI ones.  Per front, three servers are shared by its tests (started
together, the first time a test needs them):

- ``pair``: two fakes on plain HTTP whose connection-level mode can switch
  (refused, a full backlog for connect timeouts); most rows;
- ``tls``: two fakes on HTTPS, with a certificate the server trusts (its
  ``SSL_CERT_FILE`` is the test CA) until a test switches one to a
  self-signed one;
- ``hold``: two fakes for the Retry-After row, which takes an upstream out
  of routing for 30 s.

Health polling is off (``--*-health-interval=0``), the back-off short, so
each test starts with both upstreams up (``Bridge.ready`` waits for it).

Some rows fail on the code of today: they describe the behaviour being
built, and are deliberately not marked xfail.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from cc50tw.codec import ErrorCode
from tests.conftest import CC50Launcher
from tests.fake_upstream import (
    ANSWER,
    CHAT,
    COMPLETION,
    COMPLETIONS,
    TEXT,
    FakePool,
    Mode,
    Play,
    Script,
    SwitchablePort,
    TLSMaterial,
    answer,
    http_error,
    in_stream,
    sse,
)
from tests.helpers import (
    LOOPBACK,
    Outcome,
    ServerProcess,
    cc50_server_command,
    free_port,
    raw_infer,
    start_logged_process,
    wait_for_port,
)

reactor: Any = _reactor

#: Short timeouts, so the timeout rows take about a second each.
CONNECT_TIMEOUT = 0.5
FIRST_EVENT_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.0
#: Short back-off, so an upstream marked down by one test is up for the next.
BACKOFF = 0.1
RETRY_AFTER = 30
#: The most one request may take here (the slowest rows: two connect timeouts).
REQUEST_DEADLINE = 15.0


# Fronts: how cc50 is told to speak to the fakes ------------------------------------------


@dataclass(frozen=True)
class Front:
    id: str
    backend: str
    path: str

    @property
    def prefix(self) -> str:
        return "llama" if self.backend == "llama_server" else "openai"

    def args(self, urls: list[str], metrics_port: int) -> list[str]:
        p = self.prefix
        args = [f"--backend={self.backend}", *[f"--{p}-url={url}" for url in urls]]
        if self.backend == "llama_server":
            args.append(f"--llama-endpoint={self.path}")
        elif self.path == CHAT:
            args.append("--openai-chat")
        return args + [
            f"--{p}-health-interval=0",
            f"--{p}-backoff={BACKOFF}",
            f"--{p}-connect-timeout={CONNECT_TIMEOUT}",
            f"--{p}-first-event-timeout={FIRST_EVENT_TIMEOUT}",
            f"--{p}-idle-timeout={IDLE_TIMEOUT}",
            f"--metrics=tcp:{metrics_port}:interface={LOOPBACK}",
        ]


FRONTS = [
    Front("llama-completion", "llama_server", COMPLETION),
    Front("llama-v1-completions", "llama_server", COMPLETIONS),
    Front("llama-v1-chat", "llama_server", CHAT),
    Front("openai-completions", "openai", COMPLETIONS),
    Front("openai-chat", "openai", CHAT),
]


# A server in front of a pool of fakes ---------------------------------------------------------


class Bridge:
    """One ``twistd cc50`` in front of a ``FakePool``, and its per-upstream metrics."""

    def __init__(self, front: Front, pool: FakePool, server: ServerProcess, metrics_port: int) -> None:
        self.front = front
        self.pool = pool
        self.server = server
        self.metrics_port = metrics_port
        self._labels: dict[int, str] = {}

    def scrape(self) -> dict[tuple[str, str, str], float]:
        """``cc50_upstream_*`` samples by (name, url, outcome)."""
        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5.0) as response:
            body = response.read().decode()
        values: dict[tuple[str, str, str], float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name.startswith("cc50_upstream_") and "url" in sample.labels:
                    values[(sample.name, sample.labels["url"], sample.labels.get("outcome", ""))] = sample.value
        return values

    def label(self, port: SwitchablePort, samples: dict[tuple[str, str, str], float]) -> str:
        """The ``url`` label the server gives ``port`` (it normalizes URLs)."""
        if port.port not in self._labels:
            for _, url, _ in samples:
                if urlsplit(url).port == port.port:
                    self._labels[port.port] = url
        return self._labels[port.port]

    def health(self) -> Health:
        samples = self.scrape()
        backoffs, attempts, up = [], [], []
        for port in self.pool.ports:
            url = self.label(port, samples)
            backoffs.append(samples.get(("cc50_upstream_backoffs_total", url, ""), 0.0))
            attempts.append(
                sum(v for (name, u, _), v in samples.items() if u == url and name == "cc50_upstream_requests_total")
            )
            up.append(samples.get(("cc50_upstream_up", url, ""), 0.0))
        return Health(backoffs, attempts, up)

    async def ready(self) -> Snapshot:
        """Every fake back to normal, both upstreams up; what was counted so far."""
        self.pool.script.reset()
        for port in self.pool.ports:
            port.fake.reset()
            await port.switch("tls" if port.scheme == "https" else "http")
        deadline = time.monotonic() + 5.0
        while not all(self.health().up) and time.monotonic() < deadline:
            await sleep(0.05)
        return self.snapshot()

    def snapshot(self) -> Snapshot:
        return Snapshot(self.pool.posts(), [list(fake.played) for fake in self.pool.fakes], self.health())

    async def infer(self, prompt: str = "Tell me a story", max_tokens: int = 16) -> Outcome:
        """One request on a fresh raw CC50 connection, in a thread: the fakes answer from this reactor."""
        address = self.server.socket_address
        outcome: Outcome = await deferToThread(raw_infer, address, prompt, max_tokens, 1, REQUEST_DEADLINE)
        return outcome


@dataclass
class Health:
    backoffs: list[float]
    attempts: list[float]
    up: list[float]


@dataclass
class Snapshot:
    posts: list[int]
    played: list[list[str]]
    health: Health


@dataclass
class Change:
    """What one test did to each upstream of the pool, in pool order."""

    posts: list[int]
    played: list[list[str]]
    backoffs: list[float]
    attempts: list[float]

    @classmethod
    def since(cls, bridge: Bridge, before: Snapshot) -> Change:
        now = bridge.snapshot()
        return cls(
            [a - b for a, b in zip(now.posts, before.posts, strict=True)],
            [a[len(b) :] for a, b in zip(now.played, before.played, strict=True)],
            [a - b for a, b in zip(now.health.backoffs, before.health.backoffs, strict=True)],
            [a - b for a, b in zip(now.health.attempts, before.health.attempts, strict=True)],
        )

    def faulted(self, label: str) -> int:
        """The index of the one upstream that played ``label``."""
        which = [i for i, played in enumerate(self.played) if label in played]
        assert len(which) == 1, f"expected one upstream to play {label!r}: {self.played}"
        return which[0]


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@dataclass
class Deployment:
    front: Front
    pair: Bridge
    tls: Bridge
    hold: Bridge


def _start(
    launcher: CC50Launcher, front: Front, pool: FakePool, name: str, env: dict[str, str] | None = None
) -> tuple[ServerProcess, int]:
    """Start (not wait for) one server; it joins ``launcher`` so teardown checks how it ends."""
    port, metrics_port = free_port(), free_port()
    argv = cc50_server_command(f"tcp:{port}:interface={LOOPBACK}", *front.args(pool.urls, metrics_port))
    log_path = launcher.directory / f"cc50-{front.id}-{name}.log"
    process = start_logged_process(argv, log_path, env=env)
    server = ServerProcess(process, log_path, port, None, LOOPBACK, argv)
    launcher.servers.append(server)
    return server, metrics_port


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return TLSMaterial.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module", params=FRONTS, ids=[front.id for front in FRONTS])
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tls_material: TLSMaterial
) -> Iterator[Deployment]:
    front: Front = request.param
    launcher = CC50Launcher(tmp_path_factory.mktemp(f"taxonomy-{front.id}"))
    pools = {
        "pair": FakePool(Script()),
        "tls": FakePool(Script()),
        "hold": FakePool(Script()),
    }
    for name, pool in pools.items():
        scheme = "https" if name == "tls" else "http"
        pool.ports = [SwitchablePort(f"{name}-{i}", pool.script, scheme, tls_material) for i in "AB"]
        for port in pool.ports:
            pytest_twisted.blockon(port.switch("tls" if scheme == "https" else "http"))
    started = {
        name: _start(
            launcher,
            front,
            pool,
            name,
            env={**os.environ, "SSL_CERT_FILE": str(tls_material.ca_path)} if name == "tls" else None,
        )
        for name, pool in pools.items()
    }

    def wait() -> None:
        for server, _ in started.values():
            assert server.port is not None
            wait_for_port(server.port, timeout=60.0, process=server.process, log_path=server.log_path)

    bridges: dict[str, Bridge] = {}
    try:
        # In a thread: each server checks the fakes' health as it starts, and they answer from this reactor.
        pytest_twisted.blockon(deferToThread(wait))
        bridges = {name: Bridge(front, pools[name], *started[name]) for name in pools}
        yield Deployment(front, bridges["pair"], bridges["tls"], bridges["hold"])
    finally:
        for pool in pools.values():
            for port in pool.ports:
                pytest_twisted.blockon(port.close())
        launcher.stop_all()


# Assertions ----------------------------------------------------------------------------------------


def marker() -> str:
    return f"marker-{uuid.uuid4().hex[:10]}"


def describe(outcome: Outcome) -> str:
    if outcome.error is not None:
        return f"RESP_ERR {outcome.error.code!r}: {outcome.error.message!r} after text {outcome.text!r}"
    return f"RESP_DONE {outcome.done} with text {outcome.text!r}"


def assert_error(outcome: Outcome, code: ErrorCode, *fragments: str) -> str:
    """One RESP_ERR with ``code``, never a DONE; its message contains each fragment (case-insensitive)."""
    assert outcome.done is None and outcome.error is not None, describe(outcome)
    message = outcome.error.message
    assert outcome.error.code == code, f"expected {code.name}, got {describe(outcome)}"
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in the message: {message!r}"
    return message


def assert_answered(outcome: Outcome, text: str = ANSWER) -> None:
    assert outcome.error is None and outcome.done is not None, describe(outcome)
    assert outcome.text.decode() == text, describe(outcome)


# The rows ---------------------------------------------------------------------------------------------

PlayFor = Callable[[str, str], Play]  # (dialect path, marker) -> what the faulting upstream plays


@dataclass(frozen=True)
class Row:
    id: str
    play: PlayFor
    code: ErrorCode
    retry: bool
    unhealthy: bool
    #: Words the message must hold besides the marker (lower case).
    says: tuple[str, ...] = ()
    #: Whether the message must carry the marker the upstream sent.
    marked: bool = True


def _openai_error(message: str, kind: str, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


HTTP_ROWS = [
    Row(
        "401",
        lambda p, m: http_error(
            "401", 401, _openai_error(f"Incorrect API key provided: sk-{m}", "invalid_request_error", "invalid_api_key")
        ),
        ErrorCode.BACKEND_ERROR,
        retry=False,
        unhealthy=False,
        says=("credential",),
    ),
    Row(
        "403",
        lambda p, m: http_error(
            "403", 403, _openai_error(f"Project {m} does not have access", "insufficient_permissions")
        ),
        ErrorCode.BACKEND_ERROR,
        retry=False,
        unhealthy=False,
        says=("credential",),
    ),
    Row(
        "404-model",
        lambda p, m: http_error(
            "404-model",
            404,
            _openai_error(f"The model `{m}` does not exist", "invalid_request_error", "model_not_found"),
        ),
        ErrorCode.BAD_REQUEST,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "400",
        lambda p, m: http_error(
            "400", 400, _openai_error(f"'temperature' must be a number ({m})", "invalid_request_error", 400)
        ),
        ErrorCode.BAD_REQUEST,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "422",
        lambda p, m: http_error(
            "422",
            422,
            {"detail": [{"type": "missing", "loc": ["body", "prompt"], "msg": f"Field required {m}", "input": {}}]},
        ),
        ErrorCode.BAD_REQUEST,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "400-context",
        lambda p, m: http_error(
            "400-context",
            400,
            {
                "error": {
                    "code": 400,
                    "message": f"the request exceeds the available context size, try increasing it ({m})",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 9000,
                    "n_ctx": 8192,
                }
            },
        ),
        ErrorCode.TOO_LARGE,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "413",
        lambda p, m: http_error("413", 413, f"Request Entity Too Large: {m}"),
        ErrorCode.TOO_LARGE,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "429",
        lambda p, m: http_error(
            "429", 429, _openai_error(f"Rate limit reached ({m})", "rate_limit_error", "rate_limit_exceeded")
        ),
        ErrorCode.OVERLOADED,
        retry=True,
        unhealthy=False,
    ),
    Row(
        "500",
        lambda p, m: http_error(
            "500", 500, {"error": {"code": 500, "message": f"{m}: the model crashed", "type": "server_error"}}
        ),
        ErrorCode.BACKEND_ERROR,
        retry=True,
        unhealthy=False,
    ),
    Row(
        "502",
        lambda p, m: http_error(
            "502", 502, f"<html><body><h1>502 Bad Gateway</h1>{m}</body></html>", content_type="text/html"
        ),
        ErrorCode.UPSTREAM_UNAVAILABLE,
        retry=True,
        unhealthy=True,
    ),
    Row(
        "503",
        lambda p, m: http_error(
            "503", 503, {"error": {"code": 503, "message": f"Loading model {m}", "type": "unavailable_error"}}
        ),
        ErrorCode.UPSTREAM_UNAVAILABLE,
        retry=True,
        unhealthy=True,
    ),
    Row(
        "504",
        lambda p, m: http_error("504", 504, f"upstream request timeout {m}"),
        ErrorCode.TIMEOUT,
        retry=True,
        unhealthy=True,
    ),
]


def _json_line(prefix: str, value: object) -> bytes:
    return f"{prefix}{json.dumps(value)}\n\n".encode()


STREAM_ROWS = [
    Row(
        "event-error",
        lambda p, m: in_stream(
            "event-error",
            p,
            [
                b"event: error\n"
                + _json_line("data: ", {"error": {"message": f"{m}: out of memory", "type": "server_error"}})
            ],
        ),
        ErrorCode.BACKEND_ERROR,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "vllm-error",
        lambda p, m: in_stream(
            "vllm-error",
            p,
            [
                sse(
                    {
                        "object": "error",
                        "message": f"{m}: generation failed",
                        "type": "BadRequestError",
                        "param": None,
                        "code": 400,
                    }
                ),
                sse("[DONE]"),
            ],
        ),
        ErrorCode.BACKEND_ERROR,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "error-line",
        lambda p, m: in_stream(
            "error-line",
            p,
            [_json_line("error: ", {"code": 500, "message": f"{m}: slot failed", "type": "server_error"})],
        ),
        ErrorCode.BACKEND_ERROR,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "data-error",
        lambda p, m: in_stream(
            "data-error", p, [sse({"error": {"code": 500, "message": f"{m}: decode failed", "type": "server_error"}})]
        ),
        ErrorCode.BACKEND_ERROR,
        retry=False,
        unhealthy=False,
    ),
    Row(
        "cut",
        lambda p, m: in_stream("cut", p, []),
        ErrorCode.BACKEND_ERROR,
        retry=False,
        unhealthy=False,
        says=("without its final event",),
        marked=False,
    ),
    Row(
        "reset",
        lambda p, m: in_stream("reset", p, [], end="reset"),
        ErrorCode.UPSTREAM_UNAVAILABLE,
        retry=False,
        unhealthy=True,
        marked=False,
    ),
    Row(
        "first-event-timeout",
        lambda p, m: Play("first-event-timeout", end="silence"),
        ErrorCode.TIMEOUT,
        retry=False,
        unhealthy=False,
        marked=False,
    ),
    Row(
        "idle-timeout",
        lambda p, m: in_stream("idle-timeout", p, [], end="silence"),
        ErrorCode.TIMEOUT,
        retry=False,
        unhealthy=True,
        marked=False,
    ),
]

RETRIED = [row for row in HTTP_ROWS if row.retry]
NOT_RETRIED = [row for row in HTTP_ROWS + STREAM_ROWS if not row.retry]


def _ids(rows: list[Row]) -> list[str]:
    return [row.id for row in rows]


# Tests: answers ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_answer(deployment: Deployment) -> None:
    """A normal stream ends in RESP_DONE with its text; one POST, to the dialect's path."""
    bridge = deployment.pair
    before = await bridge.ready()
    outcome = await bridge.infer()
    assert_answered(outcome)
    assert outcome.done is not None and outcome.done.tokens == 3, describe(outcome)
    change = Change.since(bridge, before)
    assert sum(change.posts) == 1, change
    # Every POST (this test's and earlier ones') went to the dialect's path.
    assert all(set(fake.posts) <= {deployment.front.path} for fake in bridge.pool.fakes), [
        fake.posts for fake in bridge.pool.fakes
    ]
    assert change.backoffs == [0, 0], change


@pytest_twisted.ensureDeferred
async def test_reasoning_reaches_the_client(deployment: Deployment) -> None:
    """Chat: ``delta.reasoning_content`` before ``delta.content``; by default both reach the client."""
    if deployment.front.path != CHAT:
        pytest.skip("reasoning_content is a field of the chat API")
    bridge = deployment.pair
    before = await bridge.ready()
    thinking = ("The user wants ", "a story. ")
    bridge.pool.script.set(Play("reasoning", events=answer(CHAT, reasoning=thinking).events))
    outcome = await bridge.infer()
    assert outcome.error is None and outcome.done is not None, describe(outcome)
    text = outcome.text.decode()
    assert "".join(thinking) in text and ANSWER in text, describe(outcome)
    assert sum(Change.since(bridge, before).posts) == 1


# Tests: HTTP errors and in-stream errors -----------------------------------------------------------------


@pytest.mark.parametrize("row", NOT_RETRIED, ids=_ids(NOT_RETRIED))
@pytest_twisted.ensureDeferred
async def test_fault_not_retried(deployment: Deployment, row: Row) -> None:
    """The request fails with the row's code and the upstream's reason; no retry; health as the row says."""
    bridge = deployment.pair
    before = await bridge.ready()
    mark = marker()
    bridge.pool.script.set(row.play(deployment.front.path, mark), faults=1)
    outcome = await bridge.infer()
    assert_error(outcome, row.code, *((mark,) if row.marked else ()), *row.says)
    change = Change.since(bridge, before)
    assert sorted(change.posts) == [0, 1], f"expected one POST in all, no retry: {change}"
    faulted = change.faulted(row.id)
    if row.unhealthy:
        assert change.backoffs[faulted] >= 1, f"the upstream should be marked down: {change}"
        assert change.backoffs[1 - faulted] == 0, change
    else:
        assert change.backoffs == [0, 0], f"no upstream may be marked down by an error its request caused: {change}"
    if row in STREAM_ROWS and row.id != "first-event-timeout":
        assert outcome.text.decode() == "".join(TEXT[:2]), (
            f"the text before the fault should reach the client: {describe(outcome)}"
        )


@pytest.mark.parametrize("row", RETRIED, ids=_ids(RETRIED))
@pytest_twisted.ensureDeferred
async def test_fault_retried_then_answered(deployment: Deployment, row: Row) -> None:
    """The first upstream plays the fault, the request moves once and the other answers: RESP_DONE."""
    bridge = deployment.pair
    before = await bridge.ready()
    bridge.pool.script.set(row.play(deployment.front.path, marker()), faults=1)
    outcome = await bridge.infer()
    assert_answered(outcome)
    change = Change.since(bridge, before)
    assert change.posts == [1, 1], f"expected one POST on each upstream (one retry): {change}"
    faulted = change.faulted(row.id)
    assert change.backoffs[1 - faulted] == 0, change
    if row.unhealthy:
        assert change.backoffs[faulted] >= 1, f"the upstream should be marked down: {change}"
    else:
        assert change.backoffs[faulted] == 0, f"the upstream should not be marked down: {change}"


@pytest.mark.parametrize("row", RETRIED, ids=_ids(RETRIED))
@pytest_twisted.ensureDeferred
async def test_fault_on_every_upstream(deployment: Deployment, row: Row) -> None:
    """Both upstreams play the fault: the row's code after exactly two POSTs (one retry, never more)."""
    bridge = deployment.pair
    before = await bridge.ready()
    mark = marker()
    bridge.pool.script.set(row.play(deployment.front.path, mark), faults=10)
    outcome = await bridge.infer()
    assert_error(outcome, row.code, mark, *row.says)
    change = Change.since(bridge, before)
    assert change.posts == [1, 1], f"expected two POSTs in all, one on each upstream: {change}"
    if row.unhealthy:
        assert all(b >= 1 for b in change.backoffs), f"both upstreams should be marked down: {change}"
    else:
        assert change.backoffs == [0, 0], f"no upstream may be marked down: {change}"


# Tests: the connection ---------------------------------------------------------------------------------------

CONNECTION_ROWS = [
    ("refused", ErrorCode.UPSTREAM_UNAVAILABLE, "refused"),
    ("connect-timeout", ErrorCode.TIMEOUT, "connect"),
]


def _mode(row: str) -> Mode:
    return "refused" if row == "refused" else "blackhole"


async def _bad(bridge: Bridge, ports: list[SwitchablePort], mode: Mode) -> None:
    for port in ports:
        await port.switch(mode)
        if mode == "blackhole" and not port.blackhole_works():
            pytest.skip(
                "a listening socket with a full backlog still accepts connections here: no way to make a connect time out"
            )


async def _retried_from_first(bridge: Bridge, mode: Mode) -> None:
    """The first upstream is broken (``mode``); requests until one tried it: each is answered by the other."""
    before = await bridge.ready()
    bad, good = bridge.pool.ports
    await _bad(bridge, [bad], mode)
    sent = 0
    for _ in range(3):
        # Whichever the server picks first: a request that went straight to the good one proves nothing, so another.
        outcome = await bridge.infer()
        sent += 1
        assert_answered(outcome)
        if Change.since(bridge, before).attempts[0] >= 1:
            break
        await sleep(BACKOFF * 2)
    change = Change.since(bridge, before)
    assert change.attempts[0] == 1, f"the broken upstream was never tried (or tried twice): {change}"
    assert change.posts == [0, sent], f"each request answered by the good upstream with one POST: {change}"
    assert change.backoffs[0] >= 1, f"the broken upstream should be marked down: {change}"
    assert change.backoffs[1] == 0, change


async def _broken_everywhere(bridge: Bridge, mode: Mode, code: ErrorCode, fragment: str) -> None:
    before = await bridge.ready()
    await _bad(bridge, bridge.pool.ports, mode)
    outcome = await bridge.infer()
    assert_error(outcome, code, fragment)
    change = Change.since(bridge, before)
    assert change.posts == [0, 0], change
    assert change.attempts == [1, 1], f"expected one attempt on each upstream (one retry, never more): {change}"
    assert all(b >= 1 for b in change.backoffs), f"both upstreams should be marked down: {change}"


@pytest.mark.parametrize("row", [r[0] for r in CONNECTION_ROWS])
@pytest_twisted.ensureDeferred
async def test_connection_fault_retried(deployment: Deployment, row: str) -> None:
    await _retried_from_first(deployment.pair, _mode(row))


@pytest.mark.parametrize("row, code, fragment", CONNECTION_ROWS, ids=[r[0] for r in CONNECTION_ROWS])
@pytest_twisted.ensureDeferred
async def test_connection_fault_everywhere(deployment: Deployment, row: str, code: ErrorCode, fragment: str) -> None:
    await _broken_everywhere(deployment.pair, _mode(row), code, fragment)


@pytest_twisted.ensureDeferred
async def test_tls_failure_retried(deployment: Deployment) -> None:
    """An https upstream whose certificate does not verify: the request moves to the other; it is marked down."""
    await _retried_from_first(deployment.tls, "tls-untrusted")


@pytest_twisted.ensureDeferred
async def test_tls_failure_everywhere(deployment: Deployment) -> None:
    """Both certificates fail to verify: UPSTREAM_UNAVAILABLE, saying why (the verifier's reason)."""
    await _broken_everywhere(deployment.tls, "tls-untrusted", ErrorCode.UPSTREAM_UNAVAILABLE, "certificate")


# Tests: keep-alive and Retry-After -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pooled_connection_closed_on_reuse(deployment: Deployment) -> None:
    """An upstream that closes a kept-alive connection as it is reused: the request succeeds on a fresh one."""
    bridge = deployment.pair
    before = await bridge.ready()
    for fake in bridge.pool.fakes:
        fake.close_on_reuse = True
    for i in range(4):
        posts = sum(bridge.pool.posts())
        outcome = await bridge.infer(f"Request {i}")
        assert_answered(outcome)
        assert sum(bridge.pool.posts()) - posts <= 2, f"request {i}: more than two POSTs: {bridge.snapshot()}"
    change = Change.since(bridge, before)
    assert change.backoffs == [0, 0], (
        f"a closed keep-alive connection says nothing about the upstream's health: {change}"
    )
    if not any("closed-on-reuse" in played for played in change.played):
        pytest.skip("the server never reused a kept-alive connection: nothing to close on reuse")


@pytest_twisted.ensureDeferred
async def test_429_retry_after(deployment: Deployment) -> None:
    """
    HTTP 429 with Retry-After: 30: the request moves once and is answered;
    that upstream gets nothing for 30 s (the next requests go to the other
    only), and it is not marked down.
    """
    bridge = deployment.hold
    before = await bridge.ready()
    mark = marker()
    body = _openai_error(f"Rate limit reached ({mark})", "rate_limit_error", "rate_limit_exceeded")
    overloaded = http_error("429-retry-after", 429, body, headers=[("Retry-After", str(RETRY_AFTER))])
    bridge.pool.script.set(overloaded, faults=1)
    assert_answered(await bridge.infer("first"))
    change = Change.since(bridge, before)
    assert change.posts == [1, 1], f"expected one retry: {change}"
    held = change.faulted("429-retry-after")
    other = 1 - held

    assert_answered(await bridge.infer("second, right after"))
    change = Change.since(bridge, before)
    assert change.posts[held] == 1 and change.posts[other] == 2, f"the held-off upstream got a request: {change}"

    # The other upstream is overloaded too: nowhere to go, OVERLOADED with its reason.
    bridge.pool.script.set(overloaded, faults=10)
    assert_error(await bridge.infer("third"), ErrorCode.OVERLOADED, mark)
    change = Change.since(bridge, before)
    assert change.posts[held] == 1, f"the held-off upstream got a request within its Retry-After: {change}"
    assert change.posts[other] == 3, change
    assert change.backoffs == [0, 0], f"429 must not mark an upstream down: {change}"
