"""
The llama-server bridge benchmarks run end to end, small, against a real
llama-server and twistd: their figures are only worth the scripts that
make them, so the scripts must keep working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.llama_fixtures import require_llama_server

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    require_llama_server()
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )


def test_bench_llama_bridge_compares_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "bridge.json"
    result = run_benchmark(
        "bench_llama_bridge.py",
        "--iterations=4",
        "--max-tokens=16",
        "--concurrency",
        "1",
        "2",
        "--twistd-arg=--llama-reasoning=drop",
        f"--json={out}",
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # both paths produced the same text
    report = json.loads(out.read_text())
    assert report["twistd_args"] == ["--llama-reasoning=drop"]
    for level in ("1", "2"):
        figures = report["levels"][level]
        for path in ("direct", "bridge"):
            assert figures[path]["requests"] == 4
            assert figures[path]["tokens"] == 4 * 16
            assert 0 < figures[path]["ttft_p50_ms"] <= figures[path]["latency_p50_ms"]
        assert figures["ratio"]["tokens_per_s_round_median"] > 0
    assert "bridge/direct: tokens/s" in result.stdout


def test_trace_llama_bridge_times_every_path(tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    result = run_benchmark("trace_llama_bridge.py", "--rounds=2", "--max-tokens=16", "--concurrency=2", f"--json={out}")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["medians"]) == {"direct", "backend", "inproc", "bridge"}
    for path, traces in report["traces"].items():
        assert len(traces) == 2 * 2, path
        for trace in traces:
            assert 0 < len(trace["arrivals"]) <= 16  # a piece per token, less what held back split characters
            assert trace["arrivals"] == sorted(trace["arrivals"])
            assert trace["arrivals"][-1] <= trace["end"]
    assert all(t["server_first"] > 0 for t in report["traces"]["bridge"])


def test_bench_llama_bridge_against_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    result = run_benchmark(
        "bench_llama_bridge.py", "--floor", "--rounds=2", "--iterations=3", "--max-tokens=8", f"--json={out}"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["bridges"]) == {"floor", "cc50tw"}
    for figures in report["bridges"].values():
        assert figures["tokens"] == 2 * 3 * 8  # both bridges stream every token, RESP_DONE counts them
        assert figures["cpu_us_per_token"] > 0
    assert len(report["bridges"]["cc50tw"]["cpu_ratio_per_round"]) == 2
    assert report["bridges"]["cc50tw"]["log_problems"] == []
    assert "cc50tw / floor per round" in result.stdout
