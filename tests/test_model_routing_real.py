"""
Routing by model, end to end: a real ``twistd cc50 --config=FILE`` in front
of three fake upstreams (``tests/fake_upstream.py``, on real sockets served
by the pytest-twisted reactor), each serving its own model in its own
dialect, two with their own API key:

- alpha: ``/v1/completions``, key ``key-alpha``, sent upstream as ``org/alpha-7b``;
- beta (the ``default_model``): ``/v1/chat/completions``, key ``key-beta``;
- gamma: llama.cpp ``/completion``, no key.

A request for a model reaches only that model's upstream, one naming none
the default's, an unknown one gets BAD_REQUEST listing the models; each
upstream sees only its own Authorization header (health checks included);
and an option given both in the file and on the command line takes the
command line's value.
"""

from __future__ import annotations

import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.web.server import Request, Site

from cc50tw.codec import ErrorCode, encode_infer
from cc50tw.generation import GenerationOptions
from tests.conftest import CC50Launcher
from tests.fake_upstream import ANSWER, CHAT, COMPLETION, COMPLETIONS, FakeUpstream, Script
from tests.helpers import (
    LOOPBACK,
    Outcome,
    RawConnection,
    ServerProcess,
    cc50_server_command,
    free_port,
    start_logged_process,
    wait_for_port,
)

reactor: Any = _reactor


class KeyedUpstream(FakeUpstream):
    """A ``FakeUpstream`` that also remembers the Authorization header of every request, GETs included."""

    def __init__(self, name: str, script: Script) -> None:
        super().__init__(name, script)
        self.authorizations: list[bytes | None] = []

    def render_GET(self, request: Request) -> bytes:
        self.authorizations.append(request.getHeader(b"authorization"))
        return super().render_GET(request)

    def render_POST(self, request: Request) -> bytes | int:
        self.authorizations.append(request.getHeader(b"authorization"))
        return super().render_POST(request)


@dataclass
class Upstream:
    fake: KeyedUpstream
    port: Any

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"


@dataclass
class Deployment:
    server: ServerProcess
    metrics_port: int
    alpha: Upstream
    beta: Upstream
    gamma: Upstream

    def infer(self, model: str | None, req_id: int = 1) -> Outcome:
        """One request (max_tokens 0: the server's --max-tokens) on a fresh connection; blocking."""
        with RawConnection(self.server.socket_address, timeout=30.0) as connection:
            connection.send(encode_infer(req_id, "Tell me a story", 0, 0, GenerationOptions(model=model)))
            return connection.collect([req_id])[req_id]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=10) as response:
            return str(response.read().decode())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("model-routing")
    upstreams = {}
    for name in ("alpha", "beta", "gamma"):
        fake = KeyedUpstream(name, Script())
        upstreams[name] = Upstream(fake, reactor.listenTCP(0, Site(fake), interface=LOOPBACK))
    (directory / "alpha.key").write_text("key-alpha\n")
    (directory / "beta.key").write_text("key-beta\n")
    config = directory / "cc50.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            backend = "openai"
            max-tokens = 7
            openai-health-path = "/v1/models"
            openai_health_interval = 0.5
            default_model = "beta"

            [[upstreams]]
            url = "{upstreams["alpha"].url}"
            dialect = "openai"
            model = "alpha"
            upstream_model = "org/alpha-7b"
            api_key_file = "alpha.key"

            [[upstreams]]
            url = "{upstreams["beta"].url}"
            dialect = "chat"
            model = "beta"
            api_key_file = "{directory / "beta.key"}"

            [[upstreams]]
            url = "{upstreams["gamma"].url}"
            dialect = "llama"
            model = "gamma"
            """
        )
    )
    launcher = CC50Launcher(directory)
    port, metrics_port = free_port(), free_port()
    argv = cc50_server_command(
        f"tcp:{port}:interface={LOOPBACK}",
        f"--config={config}",
        "--max-tokens=5",  # the file says 7: the command line wins
        f"--metrics=tcp:{metrics_port}:interface={LOOPBACK}",
    )
    log_path = directory / "cc50.log"
    server = ServerProcess(start_logged_process(argv, log_path), log_path, port, None, LOOPBACK, argv)
    launcher.servers.append(server)
    try:
        # In a thread: the server checks the fakes' health as it starts, and they answer from this reactor.
        pytest_twisted.blockon(
            deferToThread(wait_for_port, port, timeout=60.0, process=server.process, log_path=log_path)
        )
        yield Deployment(server, metrics_port, upstreams["alpha"], upstreams["beta"], upstreams["gamma"])
    finally:
        for upstream in upstreams.values():
            pytest_twisted.blockon(upstream.port.stopListening())
        launcher.stop_all()


def posts(deployment: Deployment) -> list[int]:
    return [upstream.fake.total_posts for upstream in (deployment.alpha, deployment.beta, deployment.gamma)]


async def infer(deployment: Deployment, model: str | None) -> Outcome:
    outcome: Outcome = await deferToThread(deployment.infer, model)
    return outcome


def answered(outcome: Outcome) -> None:
    assert outcome.error is None, outcome.error
    assert outcome.done is not None
    assert outcome.text.decode() == ANSWER


@pytest_twisted.ensureDeferred
async def test_each_model_goes_to_its_own_upstream(deployment: Deployment) -> None:
    before = posts(deployment)
    answered(await infer(deployment, "alpha"))
    assert [a - b for a, b in zip(posts(deployment), before, strict=True)] == [1, 0, 0]
    assert deployment.alpha.fake.posts[COMPLETIONS] >= 1
    body = deployment.alpha.fake.bodies[-1]
    assert body["model"] == "org/alpha-7b"  # its upstream_model, not the name the client used
    assert body["max_tokens"] == 5  # --max-tokens=5 on the command line beat max-tokens = 7 in the file

    before = posts(deployment)
    answered(await infer(deployment, "beta"))
    assert [a - b for a, b in zip(posts(deployment), before, strict=True)] == [0, 1, 0]
    assert deployment.beta.fake.posts[CHAT] >= 1
    assert deployment.beta.fake.bodies[-1]["model"] == "beta"

    before = posts(deployment)
    answered(await infer(deployment, "gamma"))
    assert [a - b for a, b in zip(posts(deployment), before, strict=True)] == [0, 0, 1]
    assert deployment.gamma.fake.posts[COMPLETION] >= 1


@pytest_twisted.ensureDeferred
async def test_no_model_goes_to_the_default(deployment: Deployment) -> None:
    before = posts(deployment)
    for _ in range(3):
        answered(await infer(deployment, None))
    assert [a - b for a, b in zip(posts(deployment), before, strict=True)] == [0, 3, 0]
    assert "model=beta" in await deferToThread(deployment.server.wait_for_log, "model=beta")


@pytest_twisted.ensureDeferred
async def test_unknown_model_is_refused_listing_the_models(deployment: Deployment) -> None:
    before = posts(deployment)
    outcome = await infer(deployment, "delta")
    assert outcome.error is not None
    assert outcome.error.code == ErrorCode.BAD_REQUEST
    assert "unknown model 'delta'" in outcome.error.message
    assert "'beta', 'alpha', 'gamma'" in outcome.error.message  # the default first
    assert posts(deployment) == before


@pytest_twisted.ensureDeferred
async def test_each_upstream_sees_only_its_own_key(deployment: Deployment) -> None:
    for model in ("alpha", "beta", "gamma"):
        answered(await infer(deployment, model))
    alpha, beta, gamma = (set(u.fake.authorizations) for u in (deployment.alpha, deployment.beta, deployment.gamma))
    assert alpha == {b"Bearer key-alpha"}, alpha  # health checks (GET /v1/models) and POSTs alike
    assert beta == {b"Bearer key-beta"}, beta
    assert gamma == {None}, gamma


@pytest_twisted.ensureDeferred
async def test_model_counter_and_log_line(deployment: Deployment) -> None:
    answered(await infer(deployment, "gamma"))
    metrics: str = await deferToThread(deployment.metrics)
    lines = [line for line in metrics.splitlines() if line.startswith("cc50_model_requests_total{")]
    assert any('model="gamma"' in line and 'outcome="done"' in line for line in lines), lines
    assert "model=gamma" in await deferToThread(deployment.server.wait_for_log, "model=gamma")


def test_config_is_reported_in_the_startup_log(deployment: Deployment) -> None:
    log = deployment.server.log()
    assert "by model, default 'beta'" in log
    assert "key-alpha" not in log and "key-beta" not in log


def test_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('backend = "openai"\n[[upstreams]]\nurl = "http://127.0.0.1:1"\ndialect = "soap"\nmodel = "m"\n')
    result = subprocess.run(
        cc50_server_command(f"tcp:{free_port()}:interface={LOOPBACK}", f"--config={config}"),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert b"upstreams[0].dialect must be one of" in result.stderr
