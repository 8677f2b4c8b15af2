"""
Helpers for tests that run real servers as subprocesses and talk to them
over real sockets.

Nothing here imports pytest or Twisted's reactor, so the same helpers serve
the pytest suites (the cc50 server here, the llama-server backend elsewhere)
and the scripts in ``benchmarks/``.

- Processes: ``free_port``, ``wait_for_port``, ``wait_for_unix_socket``,
  ``start_logged_process``, ``stop_process`` and ``ServerProcess`` (a started
  server with its log), plus ``twistd_command`` / ``cc50_command`` that find
  the console scripts next to the running interpreter.
- Raw CC50 over plain blocking sockets: ``RawConnection`` (send bytes, read
  frames with a deadline, expect a close), ``Outcome`` (what one request
  received) and ``raw_infer`` (one whole request on a fresh connection).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cc50tw.codec import (
    DoneStats,
    ErrorReply,
    Frame,
    FrameDecoder,
    MessageType,
    Oversized,
    decode_done,
    decode_error,
    encode_infer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

#: Lines in a server log that mean something went wrong inside the server.
LOG_PROBLEMS = ("Traceback (most recent call last)", "Unhandled Error", "Unhandled error in Deferred")


#: How a ``twistd cc50`` stopped by SIGTERM must exit: it drains, then exits 0
#: (cc50tw clears the signal twistd would otherwise re-raise).
CLEAN_EXIT_ON_SIGTERM = (0,)


class StartupFailed(AssertionError):
    """A server process did not come up; the message carries its log."""


# Commands ------------------------------------------------------------------


def console_script(name: str, module: str | None = None) -> list[str]:
    """
    The argv prefix that runs console script ``name`` of this interpreter's
    environment: ``<venv>/bin/name`` if it exists, else ``python -m module``.
    """
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    if module is None:
        raise FileNotFoundError(f"no {name!r} next to {sys.executable} and no module fallback")
    return [sys.executable, "-m", module]


def twistd_command(*args: str) -> list[str]:
    """``twistd``; without the script (a ``pip install --target`` tree), its entry point by hand."""
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.exists():
        return [str(candidate), *args]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


def cc50_command(*args: str) -> list[str]:
    return console_script("cc50", "cc50tw.cli") + list(args)


def cc50_server_command(listen: str | Sequence[str], *extra_args: str) -> list[str]:
    """``twistd -n --pidfile= cc50 --listen=... EXTRA``: foreground, no pidfile, log to stdout."""
    listens = [listen] if isinstance(listen, str) else list(listen)
    return twistd_command("-n", "--pidfile=", "cc50", *[f"--listen={item}" for item in listens], *extra_args)


# Ports and sockets ---------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """
    A TCP port that nothing listens on right now.

    Another process can take it before ours binds it, so starters should
    retry on "Address already in use" (``start_server`` does).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path | None, chars: int = 4000) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace")
    return text[-chars:] if len(text) > chars else text


def _wait_until_connectable(
    address: object,
    what: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None,
    log_path: Path | None,
    family: int,
) -> None:
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise StartupFailed(
                f"{what}: process exited with status {process.returncode} before accepting connections\n"
                f"--- log ({log_path}) ---\n{_tail(log_path)}"
            )
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(address)  # type: ignore[arg-type]
                return
            except OSError as e:
                last_error = e
        if time.monotonic() >= deadline:
            raise StartupFailed(
                f"{what}: not accepting connections after {timeout:g}s (last error: {last_error})\n"
                f"--- log ({log_path}) ---\n{_tail(log_path)}"
            )
        time.sleep(0.05)


def wait_for_port(
    port: int,
    host: str = LOOPBACK,
    timeout: float = 20.0,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """
    Return once ``host:port`` accepts a TCP connection.

    Fails early (``StartupFailed`` with the log's tail) if ``process`` exits,
    and after ``timeout`` seconds otherwise.
    """
    _wait_until_connectable((host, port), f"{host}:{port}", timeout, process, log_path, socket.AF_INET)


def wait_for_unix_socket(
    path: str | Path,
    timeout: float = 20.0,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """As ``wait_for_port``, for a Unix-domain socket."""
    _wait_until_connectable(str(path), f"unix:{path}", timeout, process, log_path, socket.AF_UNIX)


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# Processes -----------------------------------------------------------------


def start_logged_process(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr going to ``log_path`` (appended)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else os.environ.copy(),
            cwd=cwd,
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0, signalled: bool = False) -> int:
    """
    SIGTERM (unless ``signalled``: already sent), then wait up to ``timeout``
    seconds; SIGKILL if it will not go.

    Returns the exit status; raises ``AssertionError`` if SIGKILL was needed.
    Sending SIGTERM only once matters: a second one reaches a twistd that is
    already stopping its reactor.
    """
    if process.poll() is not None:
        return process.returncode
    if not signalled:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
        raise AssertionError(f"pid {process.pid} ignored SIGTERM for {timeout:g}s and was killed") from None


@dataclass
class ServerProcess:
    """A server started by a test: its process, its log and where it listens."""

    process: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    unix_path: Path | None = None
    host: str = LOOPBACK
    argv: list[str] = field(default_factory=list)
    #: Set to True in a test that provokes server-side tracebacks on purpose.
    allow_log_problems: bool = False
    #: The exit status, once ``stop`` has run.
    exit_status: int | None = None
    #: Whether SIGTERM has been sent.
    signalled: bool = False

    @property
    def address(self) -> str:
        """``HOST:PORT`` (the C++ tools' form) or ``unix:PATH``."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """A Twisted client endpoint string for this server."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"tcp:{self.host}:{self.port}"

    @property
    def socket_address(self) -> tuple[str, int] | str:
        if self.unix_path is not None:
            return str(self.unix_path)
        assert self.port is not None
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """
        The log, once it holds ``text``: request lines are buffered and
        written every 100 ms (cc50tw.accesslog), so they may lag the answer.
        """
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def log_tail(self, chars: int = 4000) -> str:
        return _tail(self.log_path, chars)

    def log_problems(self) -> list[str]:
        """Lines of the log that show an error inside the server."""
        return [line for line in self.log().splitlines() if any(p in line for p in LOG_PROBLEMS)]

    def connect(self, timeout: float = 10.0, recv_buffer: int | None = None) -> RawConnection:
        return RawConnection(self.socket_address, timeout, recv_buffer)

    def terminate(self) -> None:
        """Send SIGTERM once, without waiting (``stop`` then waits)."""
        if not self.signalled and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.signalled = True

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (once) and wait (see ``stop_process``); remembers the status."""
        if self.exit_status is None:
            self.exit_status = stop_process(self.process, timeout, self.signalled)
            self.signalled = True
        return self.exit_status

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # After the command name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def thread_cpu_seconds(self) -> float:
        """
        The run time of the process's threads so far, from
        /proc/PID/task/*/schedstat: in ns, so short spans can be measured
        (``cpu_seconds`` counts clock ticks, 10 ms); NaN where the kernel
        has no schedstat.
        """
        try:
            ns = sum(
                int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{self.pid}/task").iterdir()
            )
        except (OSError, ValueError):
            return math.nan
        return ns / 1e9


def start_server(
    argv_for: Callable[[str], list[str]],
    log_path: Path,
    *,
    port: int | None = None,
    unix_path: Path | None = None,
    listen: str | None = None,
    host: str = LOOPBACK,
    timeout: float = 20.0,
    attempts: int = 3,
) -> ServerProcess:
    """
    Start a server and wait until it accepts connections.

    ``argv_for(listen)`` builds the command for an endpoint description.
    With neither ``port`` nor ``unix_path`` a free loopback port is chosen
    (and another one tried if the first is taken before the server binds it).
    ``listen`` overrides the description passed (e.g. the ``HOST:PORT`` form);
    ``port`` / ``unix_path`` still say where to wait.
    """
    chosen = port is None and unix_path is None
    for attempt in range(1, attempts + 1):
        this_port = free_port(host) if chosen else port
        if listen is not None:
            description = listen
        elif unix_path is not None:
            description = f"unix:{unix_path}"
        else:
            description = f"tcp:{this_port}:interface={host}"
        argv = argv_for(description)
        process = start_logged_process(argv, log_path)
        handle = ServerProcess(process, log_path, this_port, unix_path, host, argv)
        try:
            if unix_path is not None:
                wait_for_unix_socket(unix_path, timeout, process, log_path)
            else:
                assert this_port is not None
                wait_for_port(this_port, host, timeout, process, log_path)
        except StartupFailed:
            if process.poll() is None:
                stop_process(process)
            lost_race = "Address already in use" in _tail(log_path, 2000)
            if chosen and lost_race and attempt < attempts:
                continue
            raise
        return handle
    raise AssertionError("unreachable")


# Raw CC50 over blocking sockets ---------------------------------------------


class ConnectionClosed(Exception):
    """The peer closed (or reset) the connection."""


@dataclass
class Outcome:
    """Everything one request received on a raw connection."""

    req_id: int
    chunks: bytearray = field(default_factory=bytearray)
    chunk_frames: int = 0
    done: DoneStats | None = None
    error: ErrorReply | None = None
    terminal_frames: int = 0

    @property
    def finished(self) -> bool:
        return self.terminal_frames > 0

    @property
    def text(self) -> bytes:
        """Every RESP_CHUNK payload, concatenated."""
        return bytes(self.chunks)


class RawConnection:
    """
    A blocking client socket that speaks CC50 bytes and nothing more.

    It never interprets what the server should have done: tests send exactly
    the bytes they mean (valid or not) and look at the frames that come back.
    ``timeout`` bounds every read, so a server that stays silent fails a test
    instead of hanging it.
    """

    def __init__(self, address: tuple[str, int] | str, timeout: float = 10.0, recv_buffer: int | None = None) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if recv_buffer is not None:
            # Before connect, so the advertised window starts small: a client
            # that does not read then fills the server's buffers sooner.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.timeout = timeout
        self.decoder = FrameDecoder(1 << 30)
        self._ready: list[Frame] = []
        self.eof = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # Sending

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_infer(self, req_id: int, prompt: str, max_tokens: int, credit_bytes: int = 0) -> None:
        self.send(encode_infer(req_id, prompt, max_tokens, credit_bytes))

    def shutdown_write(self) -> None:
        """Half-close: the server sees end-of-stream, we can still read."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a crashed client would."""
        if self.sock.family == socket.AF_INET:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()

    # Receiving

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete frame before the deadline")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            raise TimeoutError("no complete frame before the deadline") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            raise ConnectionClosed("server closed the connection")
        for item in self.decoder.feed(data):
            assert isinstance(item, Frame), f"server sent an oversized frame header: {item!r}"
            self._ready.append(item)

    def read_frame(self, timeout: float | None = None) -> Frame:
        """The next frame; ``TimeoutError`` or ``ConnectionClosed`` if none comes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._ready:
            self._fill(deadline)
        return self._ready.pop(0)

    def read_frames(self, count: int, timeout: float | None = None) -> list[Frame]:
        return [self.read_frame(timeout) for _ in range(count)]

    def expect_silence(self, seconds: float = 0.3) -> None:
        """Assert that nothing arrives (and the connection stays open) for ``seconds``."""
        try:
            frame = self.read_frame(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no frame, got {describe_frame(frame)}")

    def expect_closed(self, timeout: float | None = None) -> list[Frame]:
        """Read until the server closes; returns the frames that came first."""
        frames: list[Frame] = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while True:
                while self._ready:
                    frames.append(self._ready.pop(0))
                self._fill(deadline)
        except ConnectionClosed:
            frames.extend(self._ready)
            self._ready.clear()
            return frames
        except TimeoutError:
            raise AssertionError(
                f"server did not close the connection; frames so far: {[describe_frame(f) for f in frames]}"
            ) from None

    def collect(self, req_ids: Iterable[int], timeout: float | None = None) -> dict[int, Outcome]:
        """
        Read frames until every request in ``req_ids`` has its terminal frame.

        Frames for other req_ids fail the test; so does anything for a request
        after its terminal frame, if it arrives before the others finish.
        """
        outcomes = {req_id: Outcome(req_id) for req_id in req_ids}
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not all(o.finished for o in outcomes.values()):
            frame = self.read_frame(max(0.0, deadline - time.monotonic()))
            apply_frame(outcomes, frame)
        return outcomes

    def infer(self, req_id: int, prompt: str, max_tokens: int, credit_bytes: int = 0) -> Outcome:
        self.send_infer(req_id, prompt, max_tokens, credit_bytes)
        return self.collect([req_id])[req_id]


def apply_frame(outcomes: dict[int, Outcome], frame: Frame) -> Outcome:
    """Account one server frame to its request; assert the protocol's invariants."""
    outcome = outcomes.get(frame.req_id)
    assert outcome is not None, f"frame for unexpected req_id: {describe_frame(frame)}"
    assert not outcome.finished, f"frame after the terminal frame of req_id {frame.req_id}: {describe_frame(frame)}"
    if frame.type == MessageType.RESP_CHUNK:
        outcome.chunks += frame.payload
        outcome.chunk_frames += 1
    elif frame.type == MessageType.RESP_DONE:
        outcome.done = decode_done(frame)
        outcome.terminal_frames += 1
    elif frame.type == MessageType.RESP_ERR:
        outcome.error = decode_error(frame)
        outcome.terminal_frames += 1
    else:
        raise AssertionError(f"server sent a frame of client type: {describe_frame(frame)}")
    return outcome


def describe_frame(frame: Frame | Oversized) -> str:
    if isinstance(frame, Oversized):
        return f"Oversized(type={frame.type}, req_id={frame.req_id}, length={frame.length})"
    try:
        name = MessageType(frame.type).name
    except ValueError:
        name = f"type {frame.type}"
    body = frame.payload[:80]
    return f"{name}(req_id={frame.req_id}, flags={frame.flags}, {len(frame.payload)} bytes: {body!r})"


def send_until_blocked(sock: socket.socket, data: bytes, seconds: float, pause: float = 0.01) -> int:
    """
    Send ``data`` without blocking until it is all sent, the peer stops
    reading (the socket stays full) for ``seconds`` in all, or the connection
    fails; the bytes sent.  How a test plays a client that floods and never reads.
    """
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(pause)
        except OSError:
            break
    return sent


def raw_infer(
    address: tuple[str, int] | str, prompt: str = "hello", max_tokens: int = 3, req_id: int = 1, timeout: float = 10.0
) -> Outcome:
    """One request on a fresh connection, closed afterwards."""
    with RawConnection(address, timeout) as conn:
        return conn.infer(req_id, prompt, max_tokens)


__all__ = [
    "CLEAN_EXIT_ON_SIGTERM",
    "LOOPBACK",
    "REPO_ROOT",
    "ConnectionClosed",
    "Outcome",
    "RawConnection",
    "ServerProcess",
    "StartupFailed",
    "apply_frame",
    "cc50_command",
    "cc50_server_command",
    "console_script",
    "describe_frame",
    "free_port",
    "port_in_use",
    "raw_infer",
    "start_logged_process",
    "start_server",
    "stop_process",
    "twistd_command",
    "wait_for_port",
    "wait_for_unix_socket",
]
