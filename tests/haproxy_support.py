"""
HAProxy for the tests and benchmarks (issue 17): find Debian's ``haproxy``,
start it on the configuration shipped in ``examples/haproxy/haproxy.cfg``
(whose site-specific values are environment variables), and ask its admin
socket which servers it has up.

Like ``tests/helpers.py`` this imports neither pytest nor the reactor, so
``benchmarks/bench_haproxy.py`` uses it too; ``tests/test_haproxy_real.py``
adds the skip-or-fail rule.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import (
    LOOPBACK,
    ServerProcess,
    cc50_server_command,
    free_port,
    start_logged_process,
    start_server,
    stop_process,
    wait_for_port,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The configuration the tests run, as shipped.
HAPROXY_CONFIG = REPO_ROOT / "examples" / "haproxy" / "haproxy.cfg"
#: Where Debian puts it; a non-root PATH often lacks /usr/sbin.
SEARCHED = ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")


def find_haproxy() -> tuple[Path | None, str]:
    """``(path, "")``, or ``(None, why not)``: ``$CC50_HAPROXY``, then PATH, then /usr/sbin."""
    configured = os.environ.get("CC50_HAPROXY")
    if configured:
        path = Path(configured)
        if path.is_file() and os.access(path, os.X_OK):
            return path, ""
        return None, f"CC50_HAPROXY={configured} is not an executable file"
    found = shutil.which("haproxy")
    if found:
        return Path(found), ""
    for candidate in SEARCHED:
        if os.access(candidate, os.X_OK):
            return Path(candidate), ""
    return None, "haproxy is not installed (apt-get install -y haproxy, or set CC50_HAPROXY=/path/to/haproxy)"


@dataclass
class Instance:
    """Where one cc50tw instance behind HAProxy listens: its CC50 port (PROXY v2) and its metrics port."""

    port: int
    metrics_port: int

    @property
    def listen(self) -> str:
        return f"haproxy:tcp:{self.port}:interface={LOOPBACK}"

    @property
    def metrics(self) -> str:
        return f"--metrics=tcp:{self.metrics_port}:interface={LOOPBACK}"

    def command(self, *extra_args: str) -> list[str]:
        return cc50_server_command(self.listen, self.metrics, *extra_args)


def new_instance() -> Instance:
    return Instance(free_port(), free_port())


def start_instance(instance: Instance, log_path: Path, *extra_args: str) -> ServerProcess:
    """A ``twistd cc50`` behind the balancer; the wait for its port is a plain connect, which it drops."""
    return start_server(
        lambda description: instance.command(*extra_args), log_path, port=instance.port, listen=instance.listen
    )


@dataclass
class HAProxy:
    """A running haproxy (foreground, ``-db``) on ``HAPROXY_CONFIG``."""

    binary: Path
    port: int
    stats_socket: Path
    log_path: Path
    environment: dict[str, str]
    process: object = field(default=None)

    @property
    def endpoint(self) -> str:
        return f"tcp:{LOOPBACK}:{self.port}"

    def command(self, *args: str) -> list[str]:
        return [str(self.binary), "-f", str(HAPROXY_CONFIG), *args]

    def start(self) -> None:
        import subprocess

        env = {**os.environ, **self.environment}
        check = subprocess.run(self.command("-c"), env=env, capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise AssertionError(f"haproxy -c refused {HAPROXY_CONFIG}:\n{check.stdout}{check.stderr}")
        self.process = start_logged_process(self.command("-db"), self.log_path, env=env)
        wait_for_port(self.port, timeout=10, process=self.process, log_path=self.log_path)  # type: ignore[arg-type]

    def stop(self) -> int:
        assert self.process is not None
        return stop_process(self.process)  # type: ignore[arg-type]

    def admin(self, command: str) -> str:
        """One command on the admin socket (``show stat``, ``show servers state``...), its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Each backend server's status as HAProxy's checks see it: ``{"cc50-a": "UP", "cc50-b": "DOWN", ...}``."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "cc50_servers" and row.get("svname") not in ("BACKEND", None):
                states[row["svname"]] = row["status"]
        return states

    def wait_for(self, wanted: dict[str, str], timeout: float = 20.0) -> None:
        """Block until the servers named are in the states given (blocking: call it off the reactor)."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.server_states()
            if all(states.get(name, "").startswith(state) for name, state in wanted.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy servers {states}, wanted {wanted} within {timeout:g}s")
            time.sleep(0.05)


def haproxy_for(
    binary: Path, instances: Sequence[Instance], directory: Path, check_interval: str = "200ms"
) -> HAProxy:
    """An HAProxy (not yet started) in front of ``instances``: two, or one listed twice."""
    first, second = (instances[0], instances[1]) if len(instances) > 1 else (instances[0], instances[0])
    port = free_port()
    stats = directory / "haproxy.sock"
    environment = {
        "CC50_HAPROXY_BIND": f"{LOOPBACK}:{port}",
        "CC50_HAPROXY_STATS": str(stats),
        "CC50_A": f"{LOOPBACK}:{first.port}",
        "CC50_B": f"{LOOPBACK}:{second.port}",
        "CC50_A_METRICS_PORT": str(first.metrics_port),
        "CC50_B_METRICS_PORT": str(second.metrics_port),
        "CC50_CHECK_INTER": check_interval,
    }
    return HAProxy(binary, port, stats, directory / "haproxy.log", environment)
