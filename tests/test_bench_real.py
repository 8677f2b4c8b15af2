"""
``cc50 bench`` as users run it, against a real ``twistd cc50``: several
client processes merged into one report, JSON, and the picture.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, cc50_command

SHARED_SERVER_ARGS = ("--toy-iters=0", "--quiet-requests")


def run(argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_processes_merge_into_one_report(shared_cc50_server: ServerProcess) -> None:
    result = run(
        cc50_command(
            "bench",
            f"--server={shared_cc50_server.endpoint}",
            "--max-tokens=5",
            "--iters=100",
            "--concurrency=8",
            "--connections=4",
            "--processes=2",
            "--json",
        )
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar into a pipe
    report = json.loads(result.stdout)
    assert (report["requests"], report["errors"], report["processes"], report["tokens"]) == (100, 0, 2, 500)
    assert len(report["samples"]["latency_ms"]) == 100
    assert report["settings"]["processes"] == 2


def test_processes_text_still_ends_with_cpp_summary(shared_cc50_server: ServerProcess) -> None:
    result = run(
        cc50_command(
            "bench",
            f"--server={shared_cc50_server.address}",
            "--max-tokens=3",
            "--iters=20",
            "--concurrency=2",
            "--connections=2",
            "--processes=2",
            "--print=1",
        )
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == " token token token"
    assert "requests=20 errors=0 concurrency=2 connections=2 processes=2 " in result.stdout
    assert re.match(r"^iters=20 mean_ms=\d+\.\d{3} p50_ms=\d+\.\d{3} p95_ms=\d+\.\d{3} p99_ms=\d+\.\d{3}$", lines[-1])


def test_more_processes_than_connections_is_a_usage_error(shared_cc50_server: ServerProcess) -> None:
    result = run(cc50_command("bench", f"--server={shared_cc50_server.address}", "--processes=3", "--connections=2"))
    assert result.returncode == 2
    assert "--processes=3 needs at least as many --connections and --concurrency" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is an optional extra")
def test_plot(shared_cc50_server: ServerProcess, tmp_path: Path) -> None:
    picture = tmp_path / "latency.png"
    result = run(cc50_command("bench", f"--server={shared_cc50_server.address}", "--iters=30", "--plot", str(picture)))
    assert result.returncode == 0, result.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout.splitlines()[-1].startswith("iters=30 ")
