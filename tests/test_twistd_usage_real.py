"""
Issue #16, "rough edges found trying cc50tw as a new user would", against
real ``twistd`` processes run the way the user ran them: a daemonized start
on a busy port, bad options, ``--help`` and ``--version``, plugins that fail
to import or are installed with ``pip install -e``, the metrics endpoint's
content type and standard series, and the exposure warning.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StartCC50
from tests.helpers import LOOPBACK, REPO_ROOT, free_port, raw_infer, twistd_command

OPERATIONS_DOC = REPO_ROOT / "docs" / "operations.md"


def run_twistd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(twistd_command(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# Item 1: a daemonized start on a busy port -------------------------------------


@pytest.mark.parametrize("busy", ["listen", "metrics"])
def test_daemonized_start_on_a_busy_port_fails_at_once(tmp_path: Path, busy_port: int, busy: str) -> None:
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    if busy == "listen":
        ports = [f"--listen=tcp:{busy_port}:interface={LOOPBACK}"]
    else:
        ports = [f"--listen=tcp:0:interface={LOOPBACK}", f"--metrics=tcp:{busy_port}:interface={LOOPBACK}"]
    started = time.monotonic()
    result = run_twistd(f"--pidfile={pidfile}", f"--logfile={logfile}", "cc50", "--toy-iters=0", *ports, cwd=tmp_path, timeout=30)
    assert time.monotonic() - started < 20
    assert result.returncode != 0
    assert f"cc50: cannot listen on {LOOPBACK}:{busy_port}" in result.stderr
    assert "Address already in use" in result.stderr
    assert not pidfile.exists(), "stale pidfile left behind"


def test_foreground_start_on_a_busy_port_leaves_no_pidfile(tmp_path: Path, busy_port: int) -> None:
    pidfile = tmp_path / "twistd.pid"
    result = run_twistd("-n", f"--pidfile={pidfile}", "cc50", f"--listen=tcp:{busy_port}:interface={LOOPBACK}", cwd=tmp_path)
    assert result.returncode != 0
    assert f"cc50: cannot listen on {LOOPBACK}:{busy_port}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not pidfile.exists()


# Item 5: usage errors, --help, --version ---------------------------------------


@pytest.mark.parametrize(
    ("argument", "named", "problem"),
    [
        ("--toy-iters=-5", "--toy-iters", "must be >= 0"),
        ("--max-frame-bytes=abc", "--max-frame-bytes", "whole number"),
        ("--listen=tcp:70000", "--listen", "not between 0 and 65535"),
        ("--idle-timeout=soon", "--idle-timeout", "number of seconds"),
    ],
)
def test_a_bad_option_is_a_short_usage_error(tmp_path: Path, argument: str, named: str, problem: str) -> None:
    result = run_twistd("-n", "--pidfile=", "cc50", argument, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "usage: twistd cc50 [options]"
    assert named in lines[1] and problem in lines[1], result.stderr
    assert "twistd cc50 --help" in lines[2]
    assert len(lines) == 3 and result.stdout == "", result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_help_groups_options_by_backend() -> None:
    result = run_twistd("cc50", "--help")
    assert result.returncode == 0, result.stderr
    headings = [line for line in result.stdout.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings[:4] == [
        "Server options:",
        "toy backend options (--backend=toy):",
        "llama_server backend options (--backend=llama_server):",
        "openai backend options (--backend=openai):",
    ], headings
    server, toy = result.stdout.split("toy backend options")[0], result.stdout.split("toy backend options")[1]
    assert "--max-queue" in server and "--toy-iters" not in server and "--llama-url" not in server
    assert "--toy-iters" in toy.split("llama_server backend options")[0]


def test_version_is_cc50tws() -> None:
    from importlib.metadata import version

    result = run_twistd("cc50", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"cc50tw {version('cc50tw')}")


# Item 7: plugins ---------------------------------------------------------------


def test_a_plugin_that_fails_to_import_is_named(tmp_path: Path) -> None:
    plugins = tmp_path / "cc50tw" / "plugins"  # no __init__.py: a third party's half of the package
    plugins.mkdir(parents=True)
    (plugins / "cc50_broken_probe.py").write_text("from cc50_broken_probe_missing import SPEC as broken\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = run_twistd("-n", "--pidfile=", "cc50", "--backend=broken", cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "unknown backend 'broken'" in result.stderr
    assert "plugin module cc50_broken_probe" in result.stderr
    assert "ModuleNotFoundError" in result.stderr and "cc50_broken_probe_missing" in result.stderr


PROBE_PACKAGE = "cc50-editable-probe"

PROBE_BACKEND = '''
"""A backend developed with pip install -e: the toy backend under another name."""

from cc50tw.backends import BackendSpec
from cc50tw.backends import toy


def build(options, reactor):
    return toy.build(options, reactor)


SPEC = BackendSpec("edprobe", "editable-install probe backend", [["edprobe-note", None, "", "unused"]], build)
'''


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def editable_probe(tmp_path: Path) -> Iterator[Path]:
    project = tmp_path / "probe"
    (project / "cc50_edprobe").mkdir(parents=True)
    (project / "cc50_edprobe" / "__init__.py").write_text("")
    (project / "cc50_edprobe" / "backend.py").write_text(PROBE_BACKEND)
    (project / "setup.py").write_text(
        textwrap.dedent(
            f"""
            from setuptools import setup

            setup(
                name="{PROBE_PACKAGE}",
                version="1.0",
                packages=["cc50_edprobe"],
                entry_points={{"cc50tw.backends": ["edprobe = cc50_edprobe.backend:SPEC"]}},
            )
            """
        )
    )
    installed = pip("install", "--no-deps", "--no-build-isolation", "-e", str(project))
    if installed.returncode != 0:
        installed = pip("install", "--no-deps", "-e", str(project))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield project
    pip("uninstall", "-y", PROBE_PACKAGE)


def test_an_editable_install_is_found_through_its_entry_point(editable_probe: Path, cc50_server: StartCC50) -> None:
    help_text = run_twistd("cc50", "--help").stdout
    assert "edprobe backend options (--backend=edprobe):" in help_text
    assert "--edprobe-note" in help_text
    server = cc50_server("--backend=edprobe", "--toy-iters=0")
    outcome = raw_infer(server.socket_address, "hi", max_tokens=3)
    assert outcome.done is not None and outcome.done.tokens == 3


# Items 10, 11, 12: metrics, the start-up line, exposure -------------------------


def http_get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_metrics_content_type_matches_the_docs_and_standard_series(cc50_server: StartCC50) -> None:
    metrics_port = free_port()
    server = cc50_server(f"--metrics=tcp:{metrics_port}:interface={LOOPBACK}", "--toy-iters=0")
    content_type, body = http_get(f"http://{LOOPBACK}:{metrics_port}/metrics")
    assert f"`{content_type}`" in OPERATIONS_DOC.read_text(), f"docs/operations.md does not name {content_type!r}"
    for name in ("process_resident_memory_bytes", "process_open_fds", "python_info", "python_gc_objects_collected_total"):
        assert re.search(rf"^{name}(\{{|\s)", body, re.M), f"{name} missing from /metrics"
    assert 'cc50_time_to_first_token_seconds_bucket{le="0.056"}' in body
    served = f"metrics on tcp:{metrics_port}:interface={LOOPBACK}"
    assert served in server.wait_for_log(served)


def test_json_log_ttft_ms_is_a_number_as_documented(cc50_server: StartCC50) -> None:
    import json

    server = cc50_server("--log-format=json", "--toy-iters=0")
    raw_infer(server.socket_address, "hi", max_tokens=2)
    deadline = time.monotonic() + 10
    events: list[dict[str, object]] = []
    while time.monotonic() < deadline and not events:
        lines = [line for line in server.log_path.read_text().splitlines() if line.startswith("{")]
        events = [event for event in map(json.loads, lines) if "req_id" in event]
        time.sleep(0.05)
    assert events, server.log_tail()
    assert isinstance(events[0]["ttft_ms"], float)
    assert "`ttft_ms` and `latency_ms` are numbers" in OPERATIONS_DOC.read_text()


def test_every_interface_without_auth_warns(cc50_server: StartCC50) -> None:
    port = free_port()
    exposed = cc50_server("--toy-iters=0", listen=f"tcp:{port}", port=port)
    # Log lines are written every 100 ms (docs/operations.md): the line may lag the port opening.
    warning = f"cc50 is serving 0.0.0.0:{port} beyond this host with no authentication"
    assert warning in exposed.wait_for_log(warning)


def test_loopback_does_not_warn(cc50_server: StartCC50) -> None:
    server = cc50_server("--toy-iters=0")
    raw_infer(server.socket_address, "hi", max_tokens=1)
    assert "beyond this host" not in server.log_path.read_text()


def test_sigterm_as_soon_as_it_listens_is_an_orderly_stop(cc50_server: StartCC50) -> None:
    """
    Was a bug (a CI run): twistd opens its ports in privilegedStartService,
    before the reactor runs and takes SIGTERM over, so a SIGTERM that came
    as soon as the port answered (a supervisor stopping a server it just
    started) killed the process outright: exit -15, no shutdown, no drain.
    Now the signal is held until the reactor runs, then is an orderly stop.
    """
    statuses = []
    for _ in range(40):
        server = cc50_server("--toy-iters=0")
        statuses.append(server.stop())
    assert statuses == [0] * len(statuses)
