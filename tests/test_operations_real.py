"""
Operating a real ``twistd cc50``: metrics and health over HTTP, the
per-request log line (text and JSON), graceful shutdown on SIGTERM, TLS and
mutual TLS from endpoint strings, and HELLO shared-token authentication.

Every server here is a subprocess started by the ``cc50_server`` fixture;
tests that stop a server themselves (to watch the drain) check its exit
status and log with ``wait_for_exit``.  Certificates are made at run time
with ``cryptography`` (the ``pki`` fixture): nothing secret is checked in.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

from cc50tw.client import connect
from cc50tw.codec import HEADER_SIZE, ErrorCode, MessageType, decode_error, encode_hello
from tests.conftest import StartCC50
from tests.helpers import (
    LOOPBACK,
    ConnectionClosed,
    Outcome,
    ServerProcess,
    apply_frame,
    cc50_command,
    describe_frame,
    free_port,
    port_in_use,
    raw_infer,
)
from tests.test_server_real import assert_completed, assert_error, run, tokens

#: LCG iterations per toy token in the drain tests: real work per token, so a
#: request takes a while, but the per-token time is measured, not assumed.
DRAIN_TOY_ITERS = 50_000


# HTTP and Prometheus ----------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """``(status, content-type, body)``; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers.get("content-type", ""), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 if absent, as for a labelled counter not yet used)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def start_with_metrics(cc50_server: StartCC50, *args: str) -> tuple[ServerProcess, str]:
    """A server with ``--metrics`` on another free loopback port; returns it and the HTTP base URL."""
    metrics_port = free_port()
    server = cc50_server(f"--metrics=tcp:{metrics_port}:interface={LOOPBACK}", *args)
    # The metrics listener is bound before the CC50 one (privilegedStartService),
    # so it is up by the time the fixture saw the CC50 port accept.
    return server, f"http://{LOOPBACK}:{metrics_port}"


# Processes --------------------------------------------------------------------


def wait_for_exit(server: ServerProcess, timeout: float) -> int:
    """Wait for a server the test sent SIGTERM (``terminate``), then check its log; returns the exit status."""
    status = server.stop(timeout)  # SIGTERM went once already: this only waits
    assert not server.log_problems(), f"errors in the server log:\n{server.log_tail()}"
    return status


def seconds_per_token(server: ServerProcess) -> float:
    """Measure the toy backend on this machine (CPU fallback or CUDA, loaded or not)."""
    outcome = raw_infer(server.socket_address, "calibrate", 20, timeout=30)
    assert outcome.done is not None, outcome.error
    return max(outcome.done.elapsed_us / 1e6 / 20, 1e-4)


def wait_until_refused(port: int, timeout: float = 3.0) -> float:
    """Seconds until nothing accepts on ``port`` any more; fails after ``timeout``."""
    start = time.monotonic()
    while port_in_use(port):
        assert time.monotonic() - start < timeout, f"port {port} still accepts connections {timeout:g}s after SIGTERM"
        time.sleep(0.01)
    return time.monotonic() - start


# Certificates -----------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path


@dataclass
class Pki:
    #: Directories for the ``tls:`` client's ``trustRoots=`` (Twisted loads every *.pem in it).
    server_ca_dir: Path
    other_ca_dir: Path
    #: PEM file for the ``mtls:`` server's ``caCerts=``.
    client_ca: Path
    server: Issued  # SAN DNS:localhost, IP:127.0.0.1, signed by the server CA
    wrong_name: Issued  # SAN DNS:elsewhere.invalid, signed by the server CA
    client: Issued  # signed by the client CA
    rogue_client: Issued  # signed by the other CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


class _CA:
    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            _builder(common_name, _name(common_name), self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, directory: Path, name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _builder(name, self.cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
        issued.cert.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        _write_key(key, issued.key)
        return issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_ca, other_ca, client_ca = _CA("cc50 test server CA"), _CA("some other CA"), _CA("cc50 test client CA")
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    return Pki(
        server_ca_dir=server_ca.write(directory / "server-ca" / "ca.pem").parent,
        other_ca_dir=other_ca.write(directory / "other-ca" / "ca.pem").parent,
        client_ca=client_ca.write(directory / "client-ca.pem"),
        server=server_ca.issue(directory, "server", local, server_auth),
        wrong_name=server_ca.issue(directory, "wrong-name", [x509.DNSName("elsewhere.invalid")], server_auth),
        client=client_ca.issue(directory, "client", [], client_auth),
        rogue_client=other_ca.issue(directory, "rogue-client", [], client_auth),
    )


def ssl_listen(kind: str, port: int, issued: Issued, *extra: str) -> str:
    return ":".join(
        [kind, str(port), f"interface={LOOPBACK}", f"privateKey={issued.key}", f"certKey={issued.cert}", *extra]
    )


def tls_client(port: int, trust: Path, client: Issued | None = None, host: str = "localhost") -> str:
    description = f"tls:{host}:{port}:trustRoots={trust}"
    if client is not None:
        description += f":certificate={client.cert}:privateKey={client.key}"
    return description


def cli_infer(server: str, *extra: str, max_tokens: int = 4) -> tuple[int, str, str]:
    result = run(
        cc50_command("infer", "--server", server, "--prompt", "Hi there", "--max-tokens", str(max_tokens), *extra)
    )
    return result.returncode, result.stdout, result.stderr


# Metrics and health -------------------------------------------------------------


def test_metrics_health_and_readiness(cc50_server: StartCC50) -> None:
    server, base = start_with_metrics(cc50_server, "--toy-iters=0")
    status, content_type, before = http_get(base + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain"), content_type
    for name in (
        "cc50_connections_open",
        "cc50_requests_in_flight",
        "cc50_requests_queued",
        "cc50_bytes_sent_total",
        "cc50_bytes_received_total",
        "cc50_flow_control_pauses_total",
        "cc50_backend_up",
        "cc50_time_to_first_token_seconds_count",
        "cc50_inter_token_latency_seconds_count",
        "cc50_request_duration_seconds_count",
        "cc50_generated_tokens_total",
        "cc50_prompt_tokens_total",
    ):
        assert re.search(rf"^{name}(\{{|\s)", before, re.M), f"{name} missing from /metrics:\n{before}"
    assert metric(before, "cc50_backend_up") == 1

    with server.connect() as conn:
        assert_completed(conn.infer(1, "count these three", 5), 5)
        _, _, during = http_get(base + "/metrics")
        assert metric(during, "cc50_connections_open") == 1
    # Requests on one connection and on another: both counted once.
    assert_completed(raw_infer(server.socket_address, "again", 7), 7)

    _, _, after = http_get(base + "/metrics")
    done = "cc50_requests_total"
    assert metric(after, done, outcome="done") - metric(before, done, outcome="done") == 2
    assert (
        metric(after, "cc50_time_to_first_token_seconds_count")
        - metric(before, "cc50_time_to_first_token_seconds_count")
        == 2
    )
    assert metric(after, "cc50_request_duration_seconds_count") == 2
    assert metric(after, "cc50_inter_token_latency_seconds_count") == 2  # one observation per request
    assert metric(after, "cc50_generated_tokens_total") == 12
    assert metric(after, "cc50_prompt_tokens_total") == 3 + 1
    # 12 chunks of " token" and two RESP_DONE frames at least (DONE's payload is 16 or 32 bytes).
    assert metric(after, "cc50_bytes_sent_total") >= 12 * (HEADER_SIZE + len(" token")) + 2 * (HEADER_SIZE + 16)
    assert metric(after, "cc50_bytes_received_total") > 0
    assert metric(after, "cc50_requests_in_flight") == 0
    deadline = time.monotonic() + 3
    while metric(after, "cc50_connections_open") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
        _, _, after = http_get(base + "/metrics")
    assert metric(after, "cc50_connections_open") == 0

    status, _, body = http_get(base + "/healthz")
    assert (status, body.split(":")[0]) == (200, "ok")
    status, _, body = http_get(base + "/readyz")
    assert status == 200 and body.startswith("ok"), body
    assert http_get(base + "/nothing-here")[0] == 404


def test_bench_prints_server_side_ttft(cc50_server: StartCC50) -> None:
    server, base = start_with_metrics(cc50_server, "--toy-iters=0")
    result = run(
        cc50_command(
            "bench",
            "--server",
            server.address,
            "--iters",
            "20",
            "--concurrency",
            "4",
            "--max-tokens",
            "5",
            "--metrics-url",
            base + "/metrics",
        )
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("server_ttft ")]
    assert len(lines) == 1, result.stdout
    assert re.fullmatch(
        rf"server_ttft mean=\d+\.\d{{3}} p50~\d+\.\d{{3}} p99~\d+\.\d{{3}} \(ms, from {re.escape(base)}/metrics, 20 requests\)",
        lines[0],
    ), lines[0]
    # The client-side figure is still there, and the C++ summary line still ends the output.
    assert any(line.startswith("ttft ") for line in result.stdout.splitlines()), result.stdout
    assert result.stdout.splitlines()[-1].startswith("iters=20 ")


# Graceful shutdown ----------------------------------------------------------------


def test_sigterm_drains_in_flight_request_then_exits_0(cc50_server: StartCC50) -> None:
    server, base = start_with_metrics(cc50_server, f"--toy-iters={DRAIN_TOY_ITERS}", "--drain-timeout=30")
    assert server.port is not None
    n = max(20, math.ceil(2.0 / seconds_per_token(server)))  # about two seconds of generation

    working = server.connect(timeout=30)
    idle = server.connect()  # open before the signal, with nothing in flight
    working.send_infer(1, "a long answer, please", n)
    outcomes = {1: Outcome(1)}
    apply_frame(outcomes, working.read_frame())
    signalled = time.monotonic()
    server.terminate()

    # The listener closes at once: new connections are refused ...
    wait_until_refused(server.port)
    # ... the load balancer sees "not ready" ...
    status, _, body = http_get(base + "/readyz")
    assert (status, body.strip()) == (503, "unavailable: shutting down")
    # ... and a new request on a connection that was already open is turned away.
    idle.send_infer(7, "too late", 3)
    assert_error(idle.read_frame(), 7, ErrorCode.SHUTTING_DOWN, "shutting down")
    assert not outcomes[1].finished, "the request ended before the checks ran; nothing was drained"

    # The request in flight finishes normally, with every token.
    while not outcomes[1].finished:
        apply_frame(outcomes, working.read_frame())
    assert_completed(outcomes[1], n)
    # Then connections close, and the process exits 0.
    assert working.expect_closed(5) == []
    assert idle.expect_closed(5) == []
    working.close()
    idle.close()
    assert wait_for_exit(server, 10) == 0
    assert time.monotonic() - signalled < 15
    log = server.log()
    assert "draining 1 in-flight requests" in log and "cc50 stopped" in log


def test_drain_timeout_ends_the_rest_with_shutting_down(cc50_server: StartCC50) -> None:
    server = cc50_server(f"--toy-iters={DRAIN_TOY_ITERS}", "--drain-timeout=1")
    n = max(50, math.ceil(6.0 / seconds_per_token(server)))  # far longer than the drain timeout

    first, second = server.connect(timeout=30), server.connect(timeout=30)
    # Two requests on one connection and one on another: each must get exactly one terminal frame.
    first.send_infer(1, "long", n)
    first.send_infer(2, "long too", n)
    second.send_infer(1, "long as well", n)
    firsts: dict[int, Outcome] = {1: Outcome(1), 2: Outcome(2)}
    seconds: dict[int, Outcome] = {1: Outcome(1)}
    apply_frame(seconds, second.read_frame())
    while not all(o.chunk_frames for o in firsts.values()):
        apply_frame(firsts, first.read_frame())

    signalled = time.monotonic()
    server.terminate()
    for conn, outcomes in ((first, firsts), (second, seconds)):
        # Everything up to the close: chunks, then exactly one RESP_ERR per request
        # (apply_frame fails on any frame after a request's terminal frame).
        for frame in conn.expect_closed(10):
            apply_frame(outcomes, frame)
        conn.close()
        for outcome in outcomes.values():
            assert outcome.terminal_frames == 1, outcome
            assert outcome.done is None, f"request {outcome.req_id} finished: the drain timeout did not apply"
            assert outcome.error is not None and outcome.error.code == ErrorCode.SHUTTING_DOWN, outcome.error
            assert "1s drain timeout" in outcome.error.message, outcome.error.message
            assert 0 < outcome.chunk_frames < n
            assert outcome.text == tokens(outcome.chunk_frames)
    ended = time.monotonic() - signalled
    assert 0.9 <= ended < 5, f"requests were ended {ended:.2f}s after SIGTERM, with --drain-timeout=1"
    assert wait_for_exit(server, 10) == 0


# Logs ------------------------------------------------------------------------


def _server_lines(server: ServerProcess) -> list[str]:
    """The log without the ``$ argv`` line that the fixture writes first."""
    return [line for line in server.log().splitlines() if line.strip() and not line.startswith("$ ")]


def test_json_logs_one_object_per_line(cc50_server: StartCC50) -> None:
    server = cc50_server("--toy-iters=0", "--log-format=json")
    assert_completed(raw_infer(server.socket_address, "short", 3, req_id=11), 3)
    assert_completed(raw_infer(server.socket_address, "a longer answer", 200, req_id=12), 200)
    assert server.stop() == 0

    events = []
    for line in _server_lines(server):
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not JSON: {line!r}")
    requests = [e for e in events if e.get("log_namespace") == "cc50tw.server.CC50ServerFactory" and "req_id" in e]
    assert sorted((e["req_id"], e["outcome"], e["tokens"]) for e in requests) == [(11, "done", 3), (12, "done", 200)]
    for event in requests:
        assert event["backend"] == "toy" and event["prompt_tokens"] >= 1
        assert re.fullmatch(r"127\.0\.0\.1:\d+", event["peer"]), event
        assert isinstance(event["latency_ms"], float) and event["bytes"] > 0
        assert event["log_level"]["name"] == "info"
    assert len(events) < 40, "a log event per chunk?"


def test_text_logs_one_line_per_request_and_none_per_chunk(cc50_server: StartCC50) -> None:
    server = cc50_server("--toy-iters=0")
    with server.connect() as conn:
        for req_id in (1, 2, 3):
            conn.send_infer(req_id, f"request {req_id}", 300)
        for outcome in conn.collect([1, 2, 3]).values():
            assert_completed(outcome, 300)
    assert_completed(raw_infer(server.socket_address, "elsewhere", 300, req_id=1), 300)
    assert server.stop() == 0

    lines = _server_lines(server)
    request_lines = [line for line in lines if re.search(r"\] request \d+ from ", line)]
    assert len(request_lines) == 4, "\n".join(lines)
    for line in request_lines:
        assert re.search(
            r"request [123] from 127\.0\.0\.1:\d+: done backend=toy tokens=300 prompt_tokens=\d+ bytes=\d+ "
            r"latency_ms=\d+\.\d{3} ttft_ms=\d+\.\d{3} finish=length$",
            line,
        ), line
    assert len({re.search(r"from (\S+):", line).group(1) for line in request_lines}) == 2  # type: ignore[union-attr]
    # 1,200 chunks were sent; the whole log is a handful of lines.
    assert len(lines) < 25, "\n".join(lines)


def test_quiet_requests_logs_no_request_lines(cc50_server: StartCC50) -> None:
    server = cc50_server("--toy-iters=0", "--quiet-requests")
    assert_completed(raw_infer(server.socket_address, "shh", 5), 5)
    assert server.stop() == 0
    assert not [line for line in _server_lines(server) if " request 1 from " in line], server.log()


# TLS ---------------------------------------------------------------------------------


def test_tls_server_with_ca_and_hostname_verification(cc50_server: StartCC50, pki: Pki) -> None:
    port, wrong_name_port = free_port(), free_port()
    server = cc50_server(
        "--toy-iters=0",
        f"--listen={ssl_listen('ssl', wrong_name_port, pki.wrong_name)}",
        port=port,
        listen=ssl_listen("ssl", port, pki.server),
    )
    # Trusted CA, name in the certificate (as DNS name and as IP address): works.
    for host in ("localhost", LOOPBACK):
        code, out, err = cli_infer(tls_client(port, pki.server_ca_dir, host=host))
        assert code == 0, err
        assert out == " token" * 4 + "\n"
    # A CA that did not sign the server's certificate: refused.
    code, out, err = cli_infer(tls_client(port, pki.other_ca_dir))
    assert code == 1 and "token" not in out
    assert "TLS: " in err and "certificate verify failed" in err and "Traceback" not in err, err
    # The right CA, but a certificate for another name: refused.
    code, out, err = cli_infer(tls_client(wrong_name_port, pki.server_ca_dir))
    assert code == 1 and "token" not in out
    assert "TLS: " in err and "DNSMismatch" in err and "Traceback" not in err, err
    # Plain CC50 on a TLS port gets nowhere, and hurts nobody.
    with pytest.raises((ConnectionClosed, ConnectionError, TimeoutError)):
        raw_infer(server.socket_address, "plaintext?", 3, timeout=2)
    code, _, err = cli_infer(tls_client(port, pki.server_ca_dir))
    assert code == 0, err


def test_mutual_tls_requires_a_client_certificate_from_the_ca(cc50_server: StartCC50, pki: Pki) -> None:
    port = free_port()
    cc50_server("--toy-iters=0", port=port, listen=ssl_listen("mtls", port, pki.server, f"caCerts={pki.client_ca}"))
    code, out, err = cli_infer(tls_client(port, pki.server_ca_dir, pki.client))
    assert code == 0, err
    assert out == " token" * 4 + "\n"
    for who, client in (("no client certificate", None), ("a certificate from another CA", pki.rogue_client)):
        code, out, err = cli_infer(tls_client(port, pki.server_ca_dir, client))
        assert code == 1 and "token" not in out, f"{who}: exit {code}, {out!r}, {err}"
        assert "TLS: " in err and "Traceback" not in err, err
    code, _, err = cli_infer(tls_client(port, pki.server_ca_dir, pki.client))
    assert code == 0, err


# Authentication -------------------------------------------------------------------


@pytest.fixture
def token_files(tmp_path: Path) -> tuple[Path, Path]:
    right, wrong = tmp_path / "token", tmp_path / "wrong-token"
    right.write_text("correct horse battery staple\n")  # the newline is not part of the token
    wrong.write_text("correct horse battery stapler\n")
    return right, wrong


def test_auth_token_cli_and_raw_clients(cc50_server: StartCC50, token_files: tuple[Path, Path]) -> None:
    right, wrong = token_files
    server = cc50_server("--toy-iters=0", f"--auth-token-file={right}")

    code, out, err = cli_infer(server.address, "--auth-token-file", str(right))
    assert code == 0, err
    assert out == " token" * 4 + "\n"
    code, out, err = cli_infer(server.address)
    assert code != 0 and "token" not in out
    assert "UNAUTHORIZED" in err, err
    code, out, err = cli_infer(server.address, "--auth-token-file", str(wrong))
    assert code != 0 and "token" not in out
    assert "UNAUTHORIZED" in err and "wrong token" in err, err

    # A C++-style client (no HELLO): its REQ_INFER gets RESP_ERR UNAUTHORIZED (15), then the close.
    with server.connect() as conn:
        conn.send_infer(1, "let me in", 3)
        frames = conn.expect_closed(5)
    assert len(frames) == 1, [describe_frame(f) for f in frames]
    assert frames[0].type == MessageType.RESP_ERR and frames[0].flags == ErrorCode.UNAUTHORIZED == 15
    assert_error(frames[0], 0, ErrorCode.UNAUTHORIZED, "HELLO")  # connection-level: req_id 0

    # The wrong token in HELLO: the same, for req_id 0.
    with server.connect() as conn:
        conn.send(encode_hello(b"correct horse battery stapler"))
        frames = conn.expect_closed(5)
    assert [(f.type, f.req_id, f.flags) for f in frames] == [(MessageType.RESP_ERR, 0, ErrorCode.UNAUTHORIZED)]
    assert "wrong token" in decode_error(frames[0]).message

    # The right token: HELLO comes back with the server's name, then requests work.
    with server.connect() as conn:
        conn.send(encode_hello(b"correct horse battery staple"))
        hello = conn.read_frame()
        assert (hello.type, hello.req_id) == (MessageType.HELLO, 0)
        assert hello.payload.startswith(b"cc50tw/")
        assert_completed(conn.infer(1, "in", 3), 3)
        assert_completed(conn.infer(2, "still in", 5), 5)


@pytest_twisted.ensureDeferred
async def test_client_library_over_mutual_tls_with_a_token(
    cc50_server: StartCC50, pki: Pki, token_files: tuple[Path, Path]
) -> None:
    from twisted.internet import reactor

    right, _ = token_files
    port = free_port()
    cc50_server(
        "--toy-iters=0",
        f"--auth-token-file={right}",
        port=port,
        listen=ssl_listen("mtls", port, pki.server, f"caCerts={pki.client_ca}"),
    )
    client = await connect(reactor, tls_client(port, pki.server_ca_dir, pki.client), token=right.read_bytes().strip())
    try:
        response = client.infer("over TLS", 6)
        completion = await response.collect()
        assert completion.text == " token" * 6
    finally:
        await client.close()
