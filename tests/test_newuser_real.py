"""
Rough edges a new user met following README.md and docs/ (issue 16 review),
as subprocess tests in the style of tests/test_cli_real.py.  Each test is a
bug as found: it fails until the bug is fixed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import LOOPBACK, ServerProcess, cc50_server_command, free_port, twistd_command
from tests.test_cli_real import assert_one_line, run

SHARED_SERVER_ARGS = ("--toy-iters=0", "--quiet-requests")


# cc50 bench --metrics-url: failures of the metrics scrape are blamed on the CC50 server ----


def test_refused_metrics_url_names_the_metrics_url(shared_cc50_server: ServerProcess) -> None:
    """
    The CC50 server is fine; only the /metrics URL is refused.  The line says
    "bench against HOST:PORT failed: Connection was refused", pointing the user
    at the wrong server (cc50tw/cli.py: the scrape at line ~256 runs inside the
    handler that words every error as the CC50 server's).
    """
    url = f"http://{LOOPBACK}:{free_port()}/metrics"
    result = run(
        "bench", "--server", shared_cc50_server.address, "--iters=2", "--max-tokens=2", "--metrics-url", url
    )
    line = assert_one_line(result, 1)
    assert url in line or "--metrics-url" in line, line


def test_metrics_url_that_is_not_a_url_is_a_usage_error(shared_cc50_server: ServerProcess) -> None:
    """
    ``--metrics-url=notaurl`` runs the whole bench, then exits 1 with
    "SchemeNotSupported: Unsupported scheme: b''"; a bad option value is exit 2
    before anything runs (README: "exit 2 for a bad option").
    """
    result = run(
        "bench", "--server", shared_cc50_server.address, "--iters=2", "--max-tokens=2", "--metrics-url=notaurl"
    )
    line = assert_one_line(result, 2)
    assert "--metrics-url" in line, line


def test_metrics_url_on_a_cc50_port_is_a_readable_line(shared_cc50_server: ServerProcess) -> None:
    """Pointing --metrics-url at the CC50 port prints treq's ``ResponseFailed([<Failure ...>])`` repr."""
    url = f"http://{shared_cc50_server.address}/metrics"
    result = run(
        "bench", "--server", shared_cc50_server.address, "--iters=2", "--max-tokens=2", "--metrics-url", url,
        "--timeout=10",
    )
    line = assert_one_line(result, 1)
    assert "<twisted.python.failure.Failure" not in line, line
    assert url in line or "--metrics-url" in line, line


# cc50 --auth-token-file ----------------------------------------------------------------


def test_missing_auth_token_file_names_the_option(shared_cc50_server: ServerProcess, tmp_path: Path) -> None:
    """
    ``cc50 infer --auth-token-file /missing`` says "infer against HOST:PORT
    failed: [Errno 2] No such file or directory" (exit 1), naming neither the
    option nor blaming the right thing; ``twistd cc50 --auth-token-file=/missing``
    says "cannot read --auth-token-file" and exits 2.
    """
    result = run(
        "infer", "--server", shared_cc50_server.address, "--prompt", "hi",
        "--auth-token-file", str(tmp_path / "missing"),
    )
    line = assert_one_line(result, 2)
    assert "--auth-token-file" in line, line


# twistd cc50 --listen=unix: in a directory that does not exist --------------------------


def test_unix_listen_in_missing_directory_is_one_line(tmp_path: Path) -> None:
    """
    A traceback (FileNotFoundError from Twisted's lockfile) instead of the one
    "cc50: cannot listen on ..." line: cc50tw/tap.py privilegedStartService
    catches only CannotListenError.
    """
    path = tmp_path / "no-such-dir" / "cc50.sock"
    result = subprocess.run(
        cc50_server_command(f"unix:{path}", "--toy-iters=0"),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert f"cannot listen on {path}" in output or f"cannot listen on unix:{path}" in output, output


def test_unix_listen_failure_names_the_path_plainly(tmp_path: Path) -> None:
    """The message reads ``cannot listen on *:b'/path/x.sock'`` (cc50tw/tap.py:515 formats a unix address as tcp)."""
    import socket

    path = tmp_path / "taken.sock"
    with socket.socket(socket.AF_UNIX) as taken:
        taken.bind(str(path))
        taken.listen(1)
        result = subprocess.run(
            cc50_server_command(f"unix:{path}", "--toy-iters=0"),
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "*:b'" not in output, output


# twistd cc50 --listen with an IPv6 interface ----------------------------------------------


@pytest.mark.parametrize("interface", ["::1", "::"])
def test_unescaped_ipv6_interface_says_how_to_write_it(interface: str) -> None:
    """``--listen=tcp:9199:interface=::1`` says "_parseTCP() got multiple values for argument 'interface'"."""
    result = subprocess.run(
        twistd_command("-n", "--pidfile=", "cc50", f"--listen=tcp:{free_port()}:interface={interface}"),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert "_parseTCP()" not in result.stderr, result.stderr
