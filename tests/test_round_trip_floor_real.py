"""
The suite's ``round_trip_floor`` runs end to end, small: its figures are
issue 18(a)'s evidence, only worth the script that makes them, so the script
must keep working, the floor that sends in the read included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_round_trip_floor_measures_every_server(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "round_trip_floor",
            "--floor-rounds",
            "1",
            "--rt-requests",
            "30",
            "--rt-warmup",
            "5",
            "--json-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env=environment,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "round_trip_floor.json").read_text())["result"]
    servers = result["servers"]
    assert {"floor", "floor-sendnow", "default", "logfile", "json", "quiet", "streamed"} <= set(servers)
    for name, figures in servers.items():
        assert figures["raw_us"]["p50"] > 0, name
        assert figures["median_round_ratio_to_floor"] > 0, name
        assert figures["median_round_ratio_to_sendnow_floor"] > 0, name
    for name in ("default", "logfile", "json"):
        assert servers[name]["request_lines_logged"] == result["requests_per_server"], name
    assert "round trip p50 / floor-sendnow (quiet)" in done.stdout
