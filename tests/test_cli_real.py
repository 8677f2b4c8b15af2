"""
The ``cc50`` command as a new user meets it (issue 16): a subprocess of the
console script against a real ``twistd cc50``, a stopped one, or a listener
that never answers.

Every failure is one line on standard error, never a traceback: exit status
2 for a bad option value (argparse refuses it before anything runs, so these
run against a live server, where nothing else could fail), 1 for what goes
wrong at run time (a refused connection, a timeout, a server error).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cc50tw
from cc50tw.codec import HEADER, HEADER_SIZE, MessageType, encode_hello
from tests.conftest import StartCC50
from tests.helpers import LOOPBACK, ServerProcess, cc50_command, free_port

SHARED_SERVER_ARGS = ("--toy-iters=0", "--quiet-requests")

#: Start-up of the console script (interpreter, Twisted, the reactor) on a busy machine.
STARTUP_SLACK = 15.0


def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cc50_command(*args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Exit ``code`` and exactly one line on standard error (returned), with no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cc50"), result.stderr
    return lines[0]


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """``HOST:PORT`` of a socket that accepts connections (in its backlog) and never reads or answers."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(64)
        yield f"{LOOPBACK}:{listener.getsockname()[1]}"


def test_version() -> None:
    result = run("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"cc50tw {cc50tw.__version__}\n", "")


# Usage errors: exit 2, before anything runs ---------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (("infer", "--max-tokens", "-1"), "argument --max-tokens: must be at least 0, got -1"),
        (("infer", "--credit-bytes", "-5"), "argument --credit-bytes: must be at least 0, got -5"),
        (("infer", "--max-tokens", "4294967296"), "argument --max-tokens: must be at most 4294967295"),
        (("infer", "--timeout", "-1"), "argument --timeout: must be a number of seconds"),
        (("infer", "--timeout", "soon"), "argument --timeout: not a number of seconds: 'soon'"),
        (("bench", "--max-tokens", "-1"), "argument --max-tokens: must be at least 0"),
        (("bench", "--credit-bytes", "-5"), "argument --credit-bytes: must be at least 0"),
        (("infer", "--credit-bytes", "2"), "argument --credit-bytes: 2 bytes cannot hold every UTF-8 character"),
        (("bench", "--credit-bytes", "3"), "argument --credit-bytes: 3 bytes cannot hold every UTF-8 character"),
        (("bench", "--iters", "0"), "argument --iters: must be at least 1"),
        (("bench", "--iters", "-1"), "argument --iters: must be at least 1"),
        (("bench", "--concurrency", "0"), "argument --concurrency: must be at least 1"),
        (("bench", "--connections", "-2"), "argument --connections: must be at least 1"),
        (("bench", "--print", "-1"), "argument --print: must be at least 0"),
        (("bench", "--processes", "0"), "argument --processes: must be at least 1"),
        (("bench", "--timeout", "nan"), "argument --timeout: must be a number of seconds"),
    ],
)
def test_bad_numbers_are_usage_errors(shared_cc50_server: ServerProcess, args: tuple[str, ...], message: str) -> None:
    command, *options = args
    result = run(command, "--server", shared_cc50_server.address, *options)
    line = assert_one_line(result, 2)
    assert line.startswith(f"cc50 {command}: error: "), line
    assert message in line, line
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["infer", "bench"])
@pytest.mark.parametrize(
    "server, message",
    [
        ("garbage", "Unknown endpoint type: 'garbage'"),
        (f"{LOOPBACK}:99999", f"port 99999 of '{LOOPBACK}:99999' is outside 1-65535"),
        ("tcp:127.0.0.1:http", "invalid literal"),
    ],
)
def test_bad_server_is_a_usage_error(command: str, server: str, message: str) -> None:
    line = assert_one_line(run(command, "--server", server), 2)
    assert "argument --server: " in line and message in line, line


def test_help_says_what_timeout_means() -> None:
    infer, bench = run("infer", "--help"), run("bench", "--help")
    assert infer.returncode == bench.returncode == 0
    assert "0 = no limit (default 60)" in " ".join(infer.stdout.split())
    assert "per request" in " ".join(bench.stdout.split()) and "(the default)" in bench.stdout


# Run-time errors: exit 1 --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("infer", "--max-tokens=1"),
        ("bench", "--iters=5", "--connections=3", "--concurrency=3"),
        ("bench", "--iters=4", "--connections=2", "--concurrency=2", "--processes=2"),
    ],
    ids=["infer", "bench", "bench-processes"],
)
def test_stopped_server_is_one_line(cc50_server: StartCC50, args: tuple[str, ...]) -> None:
    """Before: ``bench`` gave a ``FirstError`` traceback where ``infer`` gave a clean line."""
    server = cc50_server("--toy-iters=0")
    assert server.stop() == 0
    command, *options = args
    line = assert_one_line(run(command, "--server", server.address, *options), 1)
    assert line.startswith(f"cc50: {command} against {server.address} failed: "), line
    assert "refused" in line.lower(), line


def test_server_error_is_one_line(cc50_server: StartCC50) -> None:
    server = cc50_server("--toy-iters=0", "--max-tokens=10", "--max-tokens-limit=10")
    result = run("infer", "--server", server.address, "--max-tokens", "11")
    line = assert_one_line(result, 1)
    assert line.startswith("cc50: error TOO_LARGE (5): "), line
    assert result.stdout == ""


# Timeouts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("infer",), ("bench", "--iters=20", "--concurrency=4", "--connections=2")],
    ids=["infer", "bench"],
)
def test_silent_listener_times_out(silent_listener: str, args: tuple[str, ...]) -> None:
    """Before: both hung forever."""
    command, *options = args
    started = time.monotonic()
    result = run(command, "--server", silent_listener, "--timeout", "1", *options, timeout=60)
    elapsed = time.monotonic() - started
    line = assert_one_line(result, 1)
    assert line.startswith(f"cc50: {command} against {silent_listener} failed: "), line
    assert "no answer within 1 s" in line, line
    assert elapsed < 1 + STARTUP_SLACK, elapsed
    assert result.stdout == ""


def test_silent_listener_with_a_token_times_out_connecting(silent_listener: str, tmp_path: Path) -> None:
    """With a token the wait is for HELLO's answer, which is part of connecting."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    started = time.monotonic()
    result = run("infer", "--server", silent_listener, "--timeout", "1", "--auth-token-file", str(token))
    line = assert_one_line(result, 1)
    assert "no authenticated connection (HELLO answered) to" in line and "within 1 s" in line, line
    assert time.monotonic() - started < 1 + STARTUP_SLACK


def test_metrics_port_times_out(cc50_server: StartCC50) -> None:
    """The user's case: ``--server`` pointed at the server's HTTP metrics port by mistake."""
    metrics_port = free_port()
    cc50_server("--toy-iters=0", f"--metrics=tcp:{metrics_port}:interface={LOOPBACK}")
    started = time.monotonic()
    result = run("infer", "--server", f"{LOOPBACK}:{metrics_port}", "--timeout", "2")
    line = assert_one_line(result, 1)
    assert line.startswith(f"cc50: infer against {LOOPBACK}:{metrics_port} failed: "), line
    assert time.monotonic() - started < 2 + STARTUP_SLACK


def test_answer_within_the_timeout(shared_cc50_server: ServerProcess) -> None:
    """A timeout that is not reached changes nothing."""
    result = run("infer", "--server", shared_cc50_server.address, "--max-tokens", "3", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout == " token token token\n"
    bench = run("bench", "--server", shared_cc50_server.address, "--max-tokens=2", "--iters=20", "--timeout=30")
    assert bench.returncode == 0, bench.stderr
    assert bench.stdout.splitlines()[-1].startswith("iters=20 ")


# Generation options and capabilities (issue 15, item 2) --------------------------------
#
# The toy backend serves one model, "toy", and honours only the ``model``
# option: anything else it must refuse rather than silently ignore.


def test_infer_with_a_model_prints_the_finish_reason(shared_cc50_server: ServerProcess) -> None:
    result = run("infer", "--server", shared_cc50_server.address, "--max-tokens", "2", "--model", "toy")
    assert result.returncode == 0, result.stderr
    assert result.stdout == " token token\n"
    [stats] = result.stderr.splitlines()
    assert stats.startswith("tokens=2 prompt_tokens=1 ") and stats.endswith(" finish_reason=length"), stats


def test_infer_without_options_has_no_finish_reason(shared_cc50_server: ServerProcess) -> None:
    """No options: the C++ client's request, and the DONE it gets has no finish reason."""
    result = run("infer", "--server", shared_cc50_server.address, "--max-tokens", "1")
    assert result.returncode == 0, result.stderr
    assert "finish_reason" not in result.stderr


def test_unknown_model_is_the_servers_message(shared_cc50_server: ServerProcess) -> None:
    result = run("infer", "--server", shared_cc50_server.address, "--model", "other")
    line = assert_one_line(result, 1)
    assert line == "cc50: error BAD_REQUEST (11): unknown model 'other'; this server serves 'toy'", line
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["infer", "bench"])
def test_option_the_toy_cannot_honour_is_refused(shared_cc50_server: ServerProcess, command: str) -> None:
    extra = ("--iters=2",) if command == "bench" else ()
    result = run(command, "--server", shared_cc50_server.address, "--temperature", "0.5", *extra)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    if command == "infer":
        line = assert_one_line(result, 1)
        assert line.startswith("cc50: error BAD_REQUEST (11): ") and "'temperature'" in line, line
    else:
        assert result.stdout.splitlines()[-1].startswith("iters=0 ")  # the C++ summary line, still last
        assert "'temperature'" in result.stderr


@pytest.mark.parametrize("command", ["infer", "bench"])
@pytest.mark.parametrize(
    "options, message",
    [
        (("--top-p", "2"), "argument --top-p: must be between 0 and 1, got 2.0"),
        (("--temperature", "warm"), "argument --temperature: not a number: 'warm'"),
        (("--seed", "1.5"), "argument --seed: not an integer: '1.5'"),
        (("--stop", ""), "argument --stop: must be a list of non-empty strings"),
        (("--extra", "[1]"), "argument --extra: must be a JSON object"),
    ],
)
def test_bad_generation_options_are_usage_errors(
    silent_listener: str, command: str, options: tuple[str, ...], message: str
) -> None:
    """Refused before connecting: against a listener that never answers, there is no wait."""
    result = run(command, "--server", silent_listener, *options, timeout=STARTUP_SLACK + 15)
    line = assert_one_line(result, 2)
    assert line.startswith(f"cc50 {command}: error: {message}"), line
    assert result.stdout == ""


def test_bench_with_a_model_keeps_the_cpp_summary_line_last(shared_cc50_server: ServerProcess) -> None:
    result = run("bench", "--server", shared_cc50_server.address, "--model=toy", "--max-tokens=2", "--iters=10")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "finish_reasons length=10" in lines
    assert lines[-1].startswith("iters=10 mean_ms="), lines[-1]


def test_models(shared_cc50_server: ServerProcess) -> None:
    plain = run("models", "--server", shared_cc50_server.address)
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, "toy\n", "")
    verbose = run("models", "--server", shared_cc50_server.address, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout.splitlines() == ["toy", f"# server: cc50tw/{cc50tw.__version__}", "# options: model"]
    as_json = run("models", "--server", shared_cc50_server.address, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"name": f"cc50tw/{cc50tw.__version__}", "options": ["model"], "models": ["toy"]}


def test_models_with_a_token(cc50_server: StartCC50, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = cc50_server("--toy-iters=0", "--auth-token-file", str(token))
    result = run("models", "--server", server.address, "--auth-token-file", str(token))
    assert (result.returncode, result.stdout) == (0, "toy\n"), result.stderr
    refused = run("models", "--server", server.address)
    line = assert_one_line(refused, 1)
    assert line.startswith(f"cc50: models against {server.address} failed: ") and "authentication" in line, line
    server.allow_log_problems = True


def test_models_from_a_server_that_names_none(old_hello_server: str) -> None:
    """An older server answers HELLO with its name alone."""
    result = run("models", "--server", old_hello_server)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    line = assert_one_line(result, 0)
    assert line == f"cc50: {old_hello_server} (cc50tw/0.0.9) does not say which models it serves", line


def test_models_times_out(silent_listener: str) -> None:
    started = time.monotonic()
    line = assert_one_line(run("models", "--server", silent_listener, "--timeout", "1"), 1)
    assert line.startswith(f"cc50: models against {silent_listener} failed: ") and "within 1 s" in line, line
    assert time.monotonic() - started < 1 + STARTUP_SLACK


@pytest.fixture
def old_hello_server() -> Iterator[str]:
    """``HOST:PORT`` of a thread answering one HELLO per connection with a name and nothing more."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(5)
                try:
                    header = connection.recv(HEADER_SIZE, socket.MSG_WAITALL)
                    _, _, kind, _, _, length = HEADER.unpack(header)
                    if length:
                        connection.recv(length, socket.MSG_WAITALL)
                    if kind == MessageType.HELLO:
                        connection.sendall(encode_hello(b"cc50tw/0.0.9"))
                    connection.recv(1)  # until the client closes
                except (OSError, struct.error):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"{LOOPBACK}:{listener.getsockname()[1]}"
    stopping.set()
    thread.join(5)
    listener.close()
