"""
Fixtures for the integration tests: real ``twistd cc50`` processes.

``cc50_server`` is a factory: ``cc50_server("--toy-iters=0", ...)`` starts
``twistd -n --pidfile= cc50 --listen=tcp:PORT:interface=127.0.0.1 ...`` on a
free loopback port (or ``unix_path=`` / ``listen=``), waits until it accepts
connections and returns a ``ServerProcess`` (``port``, ``process``,
``log_path``, ``address``, ``endpoint``).  At teardown every server it
started gets SIGTERM and must exit promptly and cleanly (status 0, or -SIGTERM, which
is how twistd reports a clean signal shutdown), and its log must
hold no traceback (a test that provokes one on purpose sets
``allow_log_problems``).

``shared_cc50_server`` is one such server for a whole test module; a module
may set ``SHARED_SERVER_ARGS`` to choose its options.

pytest-twisted is enabled by its entry point (no ``-p`` needed); tests that
use the client library are ``@pytest_twisted.ensureDeferred`` coroutines.

The hostile-input, fault and soak tests (issue 8) append rows to
``HOSTILE_SUMMARY``; ``pytest_terminal_summary`` prints them as one table at
the end of the run (cases per category, crashes, requests lost, peak RSS).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.helpers import CLEAN_EXIT_ON_SIGTERM, ServerProcess, cc50_server_command, start_server

DEFAULT_SERVER_ARGS = ("--toy-iters=0",)

#: Rows of the hostile-input and soak summary (issue 8), appended by those
#: tests and printed at the end of the session by ``pytest_terminal_summary``.
HOSTILE_SUMMARY: list[dict[str, object]] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not HOSTILE_SUMMARY:
        return
    write = terminalreporter.write_line
    terminalreporter.section("hostile input, faults and soak (issue 8)")
    write(f"{'suite':<16} {'category':<32} {'cases':>8} {'crashes':>8} {'lost':>6} {'peak RSS MiB':>13}")
    for row in HOSTILE_SUMMARY:
        rss = row.get("peak_rss")
        rss_text = f"{int(rss) / (1 << 20):.1f}" if isinstance(rss, int) else "-"
        write(
            f"{row['suite']!s:<16} {row['category']!s:<32} {row['cases']!s:>8} {row.get('crashes', 0)!s:>8} "
            f"{row.get('lost', 0)!s:>6} {rss_text:>13}"
        )


class StartCC50(Protocol):
    def __call__(
        self,
        *extra_args: str,
        port: int | None = None,
        unix_path: Path | None = None,
        listen: str | None = None,
    ) -> ServerProcess: ...


class CC50Launcher:
    """Starts ``twistd cc50`` servers and checks how each one ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[ServerProcess] = []

    def start(
        self,
        *extra_args: str,
        port: int | None = None,
        unix_path: Path | None = None,
        listen: str | None = None,
    ) -> ServerProcess:
        log_path = self.directory / f"cc50-server-{len(self.servers)}.log"
        server = start_server(
            lambda description: cc50_server_command(description, *extra_args),
            log_path,
            port=port,
            unix_path=unix_path,
            listen=listen,
        )
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        report: list[str] = []
        for server in self.servers:
            if server.exit_status is not None:
                continue  # the test stopped it and checked how
            if server.signalled:
                try:
                    server.stop(timeout=20.0)
                except AssertionError as e:
                    report.append(f"server {server.address} (pid {server.pid}): {e}")
                continue
            problems: list[str] = []
            was_alive = server.alive()
            try:
                status = server.stop(timeout=10.0)
            except AssertionError as e:
                problems.append(str(e))
            else:
                if not was_alive:
                    problems.append(f"the server had already exited (status {status}) before teardown")
                elif status not in CLEAN_EXIT_ON_SIGTERM:
                    problems.append(f"exit status {status} after SIGTERM")
            if not server.allow_log_problems and server.log_problems():
                problems.append(f"errors in the server log: {server.log_problems()[:5]}")
            if problems:
                report.append(
                    f"server {server.address} (pid {server.pid}): "
                    + "; ".join(problems)
                    + f"\n--- {server.log_path} ---\n{server.log_tail()}"
                )
        if report:
            pytest.fail("\n".join(report), pytrace=False)


@pytest.fixture
def cc50_server(tmp_path: Path) -> Iterator[StartCC50]:
    """Factory: start real ``twistd cc50`` servers, stopped and checked at teardown."""
    launcher = CC50Launcher(tmp_path)
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="module")
def shared_cc50_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server for the module, with the module's ``SHARED_SERVER_ARGS``."""
    args = tuple(getattr(request.module, "SHARED_SERVER_ARGS", DEFAULT_SERVER_ARGS))
    launcher = CC50Launcher(tmp_path_factory.mktemp("cc50-shared"))
    server = launcher.start(*args)
    yield server
    launcher.stop_all()
