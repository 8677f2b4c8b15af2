"""
A fake HTTP inference upstream for the error-taxonomy tests: real sockets,
served by Twisted in the test process (the pytest-twisted reactor, as
``FaultProxy`` in ``tests/test_upstream_faults_real.py`` is).

It speaks the three streaming dialects cc50tw's HTTP backends use
(llama.cpp ``/completion``, OpenAI ``/v1/completions`` and
``/v1/chat/completions``) and can play every upstream failure of the
taxonomy: an HTTP error status with a body, an error inside the event
stream, a stream that is cut, reset or goes silent, and, at the connection
level (``SwitchablePort``), a refused connection, a connect that never
completes (a listening socket with a full backlog) and a TLS certificate
the client cannot verify.

- ``Play``: what one POST gets (status, headers, body or SSE events, and how
  the response ends); ``answer``, ``text_events``, ``final_events`` and
  ``http_error`` build them per dialect.
- ``Script``: shared by the fakes of one pool, it decides what each POST
  plays: the first ``faults`` POSTs, whichever fake they reach, play the
  fault, the rest the normal answer.  So "the first attempt fails, the retry
  succeeds" needs no knowledge of the server's routing.
- ``FakeUpstream``: the ``Resource``; counts every POST per path and
  remembers what it played, so tests can assert exact retry counts.  GETs
  (health checks) always answer 200 and are not counted.
- ``SwitchablePort``: one fixed port whose mode a test switches: ``http``
  (the fake, plain), ``tls`` (the fake behind a certificate the server
  trusts), ``tls-untrusted`` (a self-signed one), ``refused`` (nothing
  listens) or ``blackhole`` (a full backlog: connects time out).
- ``TLSMaterial``: a throw-away CA (hand ``ca_path`` to the server as
  ``SSL_CERT_FILE``), a certificate it signed and a self-signed one, both
  for 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from weakref import WeakKeyDictionary

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IOpenSSLContextFactory
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from tests.helpers import LOOPBACK

reactor: Any = _reactor

COMPLETION = "/completion"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
PATHS = (COMPLETION, COMPLETIONS, CHAT)

#: The text a normal answer streams, piece by piece.
TEXT = ("Hello", ", ", "world")
#: What the client receives from a normal answer.
ANSWER = "".join(TEXT)

#: How a response ends once its events are written.
End = Literal["finish", "reset", "silence"]


# SSE per dialect ---------------------------------------------------------------------


def sse(value: object) -> bytes:
    """One ``data:`` event: ``value`` as JSON, or as is if it is a string."""
    data = value if isinstance(value, str) else json.dumps(value)
    return f"data: {data}\n\n".encode()


def text_events(path: str, pieces: Sequence[str] = TEXT, reasoning: Sequence[str] = ()) -> list[bytes]:
    """The events that stream ``pieces`` (after ``reasoning``, chat only), without the final ones."""
    events: list[bytes] = []
    if path == COMPLETION:
        for i, piece in enumerate(pieces):
            events.append(sse({"index": 0, "content": piece, "tokens": [100 + i], "stop": False}))
    elif path == COMPLETIONS:
        for piece in pieces:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            events.append(sse({"id": "cmpl-fake", "object": "text_completion", "model": "fake", "choices": [choice]}))
    elif path == CHAT:
        deltas: list[dict[str, str]] = [{"role": "assistant", "content": ""}]
        deltas += [{"reasoning_content": piece} for piece in reasoning]
        deltas += [{"content": piece} for piece in pieces]
        for delta in deltas:
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            events.append(
                sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": "fake", "choices": [choice]})
            )
    else:
        raise ValueError(f"unknown dialect path {path!r}")
    return events


def final_events(path: str, generated: int) -> list[bytes]:
    """The events that end a normal stream of ``generated`` tokens."""
    if path == COMPLETION:
        return [
            sse(
                {
                    "index": 0,
                    "content": "",
                    "tokens": [],
                    "stop": True,
                    "stop_type": "eos",
                    "tokens_evaluated": 4,
                    "tokens_predicted": generated,
                }
            )
        ]
    usage = {"prompt_tokens": 4, "completion_tokens": generated, "total_tokens": 4 + generated}
    if path == COMPLETIONS:
        last: dict[str, Any] = {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
        kind = "text_completion"
    else:
        last = {"index": 0, "delta": {}, "finish_reason": "stop"}
        kind = "chat.completion.chunk"
    return [
        sse({"id": "fake", "object": kind, "model": "fake", "choices": [last]}),
        sse({"id": "fake", "object": kind, "model": "fake", "choices": [], "usage": usage}),
        sse("[DONE]"),
    ]


# What one POST gets ----------------------------------------------------------------------


@dataclass(frozen=True)
class Play:
    """
    The response to one POST.

    ``status`` 200: the headers of an event stream, then ``events`` (bytes
    written as they are, one write each), then ``end``: ``finish`` (a clean
    end of the body), ``reset`` (a TCP RST a moment later) or ``silence``
    (nothing more, the connection held open until the client goes).  With
    no events and ``silence`` not even the headers are sent.  Any other
    status: ``body`` with ``content_type`` and ``headers``.
    """

    label: str
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    events: tuple[bytes, ...] = ()
    end: End = "finish"


def answer(path: str, pieces: Sequence[str] = TEXT, reasoning: Sequence[str] = ()) -> Play:
    """A complete, normal answer in the dialect at ``path``."""
    events = text_events(path, pieces, reasoning) + final_events(path, len(pieces) + len(reasoning))
    return Play("normal", events=tuple(events))


def http_error(
    label: str, status: int, body: object, headers: Sequence[tuple[str, str]] = (), content_type: str | None = None
) -> Play:
    """An HTTP error: ``body`` as JSON (a ``str`` goes as plain text)."""
    if isinstance(body, str):
        data, kind = body.encode(), content_type or "text/plain; charset=utf-8"
    else:
        data, kind = json.dumps(body).encode(), content_type or "application/json"
    return Play(label, status=status, body=data, content_type=kind, headers=tuple(headers))


def in_stream(label: str, path: str, tail: Sequence[bytes], end: End = "finish") -> Play:
    """Some text (``Hello, ``), then ``tail`` (raw bytes), then ``end``."""
    return Play(label, events=(*text_events(path, TEXT[:2]), *tail), end=end)


class Script:
    """
    What the POSTs to a pool of fakes play: the first ``faults`` POSTs (in
    the order they arrive, whichever fake gets them) play ``fault``, every
    other POST the normal answer for its path.
    """

    def __init__(self) -> None:
        self.fault: Play | None = None
        self.faults = 0

    def set(self, fault: Play | None, faults: int = 1) -> None:
        self.fault, self.faults = fault, faults if fault is not None else 0

    def reset(self) -> None:
        self.set(None)

    def next(self, path: str) -> Play:
        if self.fault is not None and self.faults > 0:
            self.faults -= 1
            return self.fault
        return answer(path)


# The fake ----------------------------------------------------------------------------------


def _reset(transport: Any) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    try:
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (AttributeError, OSError):
        pass
    transport.abortConnection()


class FakeUpstream(Resource):
    """
    One fake upstream: answers each POST as its ``Script`` says, counts it.

    ``close_on_reuse``: a connection that already carried one answer is
    closed (without an answer) when a second request arrives on it, as an
    upstream that closes idle keep-alive connections does when the close
    races the client's reuse.
    """

    isLeaf = True

    def __init__(self, name: str, script: Script) -> None:
        super().__init__()
        self.name = name
        self.script = script
        #: POSTs received, by path (a POST on a connection closed on reuse counts too).
        self.posts: Counter[str] = Counter()
        #: Labels of what each POST played, in order ("normal", a fault's label, "closed-on-reuse").
        self.played: list[str] = []
        #: The JSON bodies of the POSTs.
        self.bodies: list[Any] = []
        self.close_on_reuse = False
        #: Answers held open by ``silence``, until the client goes.
        self.held: set[Request] = set()
        self._served: WeakKeyDictionary[HTTPChannel, int] = WeakKeyDictionary()

    @property
    def total_posts(self) -> int:
        return sum(self.posts.values())

    def reset(self) -> None:
        """Forget nothing counted, but end held answers and the reuse mode."""
        self.close_on_reuse = False
        for request in list(self.held):
            if request.channel is not None:
                _reset(request.channel.transport)
        self.held.clear()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/v1/models":
            return json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
        return b'{"status": "ok"}'

    def render_POST(self, request: Request) -> bytes | int:
        path = request.path.decode("latin-1")
        self.posts[path] += 1
        assert request.content is not None
        try:
            self.bodies.append(json.loads(request.content.read()))
        except ValueError:
            self.bodies.append(None)
        channel = request.channel
        served = self._served.get(channel, 0) if channel is not None else 0
        if channel is not None:
            self._served[channel] = served + 1
        if self.close_on_reuse and served >= 1 and channel is not None:
            self.played.append("closed-on-reuse")
            channel.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        play = self.script.next(path)
        self.played.append(play.label)
        if play.status != 200:
            request.setResponseCode(play.status)
            request.setHeader(b"content-type", play.content_type.encode())
            for name, value in play.headers:
                request.setHeader(name.encode(), value.encode())
            return play.body
        if play.events or play.end != "silence":
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            for event in play.events:
                request.write(event)
        if play.end == "finish":
            request.finish()
        elif play.end == "reset":
            transport = channel.transport if channel is not None else None
            # A moment later, so the events written first reach the client.
            reactor.callLater(0.2, _reset, transport)
        else:
            self.held.add(request)
            request.notifyFinish().addBoth(lambda _: self.held.discard(request))
        return NOT_DONE_YET


class _TrackingSite(Site):
    """A ``Site`` that remembers its open connections, so a mode switch can close them."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.noisy = False
        self.open: set[Protocol] = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self.open.add(protocol)
            lost = protocol.connectionLost

            def connectionLost(reason: Failure) -> None:
                self.open.discard(protocol)
                lost(reason)

            protocol.connectionLost = connectionLost  # type: ignore[method-assign]
        return protocol

    def abortAll(self) -> None:
        for protocol in list(self.open):
            # Site builds a wrapper that hands everything to the real channel.
            channel = getattr(protocol, "_channel", protocol)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()


# TLS material --------------------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        alt = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")])
        builder = builder.add_extension(alt, critical=False)
    return builder.sign(signer, hashes.SHA256())


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """A server-side TLS context factory for ``listenSSL``, from ``cryptography`` objects."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.certificate = certificate
        self.key = key

    def getContext(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(self.certificate)
        context.use_privatekey(self.key)
        return context


@dataclass
class TLSMaterial:
    """A CA written to ``ca_path``, server options for a certificate it signed, and for a self-signed one."""

    ca_path: Path
    trusted: ServerTLS
    untrusted: ServerTLS

    @classmethod
    def create(cls, directory: Path) -> TLSMaterial:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("cc50 test CA", ca_key, "cc50 test CA", ca_key, ca=True)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate(LOOPBACK, leaf_key, "cc50 test CA", ca_key, ca=False)
        rogue_key = ec.generate_private_key(ec.SECP256R1())
        rogue = _certificate(LOOPBACK, rogue_key, LOOPBACK, rogue_key, ca=False)
        ca_path = directory / "ca.pem"
        ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        return cls(ca_path, ServerTLS(leaf, leaf_key), ServerTLS(rogue, rogue_key))


# One port, many failure modes --------------------------------------------------------------------

Mode = Literal["http", "tls", "tls-untrusted", "refused", "blackhole"]


class SwitchablePort:
    """
    A fake upstream on a fixed loopback port whose connection-level
    behaviour a test switches (``switch``): see the module docstring.
    ``scheme`` is what its URL says (``https`` for the TLS modes).
    """

    def __init__(self, name: str, script: Script, scheme: str = "http", tls: TLSMaterial | None = None) -> None:
        self.fake = FakeUpstream(name, script)
        self.site = _TrackingSite(self.fake)
        self.scheme = scheme
        self.tls = tls
        self.mode: Mode = "refused"
        self._listening: IListeningPort | None = None
        self._raw: list[socket.socket] = []
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind((LOOPBACK, 0))
        self.port = int(probe.getsockname()[1])
        probe.close()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def switch(self, mode: Mode) -> Deferred[None]:
        """Close whatever the port does now (its open connections too), then start ``mode``."""
        if mode == self.mode:
            return succeed(None)
        stopped = self._stop()

        def start(_: object) -> None:
            self._start(mode)

        return stopped.addCallback(start)

    def _stop(self) -> Deferred[None]:
        self.site.abortAll()
        self.fake.reset()
        for sock in self._raw:
            sock.close()
        self._raw.clear()
        listening, self._listening = self._listening, None
        self.mode = "refused"
        if listening is None:
            return succeed(None)
        return maybeDeferred(listening.stopListening).addCallback(lambda _: None)

    def _start(self, mode: Mode) -> None:
        if mode == "http":
            self._listening = reactor.listenTCP(self.port, self.site, interface=LOOPBACK)
        elif mode in ("tls", "tls-untrusted"):
            assert self.tls is not None, "this port has no TLS material"
            options = self.tls.trusted if mode == "tls" else self.tls.untrusted
            self._listening = reactor.listenSSL(self.port, self.site, options, interface=LOOPBACK)
        elif mode == "blackhole":
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LOOPBACK, self.port))
            listener.listen(0)
            self._raw.append(listener)
            # Fill the accept queue (never accepted): further SYNs are dropped,
            # so a connect neither succeeds nor fails until the client gives up.
            for _ in range(3):
                filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                filler.setblocking(False)
                filler.connect_ex((LOOPBACK, self.port))
                self._raw.append(filler)
        self.mode = mode

    def blackhole_works(self, timeout: float = 0.3) -> bool:
        """Whether a connect to the port (in ``blackhole`` mode) really hangs on this machine."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            try:
                probe.connect((LOOPBACK, self.port))
            except TimeoutError:
                return True
            except OSError:
                return False
            return False

    def close(self) -> Deferred[None]:
        return self._stop()


@dataclass
class FakePool:
    """The fakes of one pool and the ``Script`` they share."""

    script: Script
    ports: list[SwitchablePort] = field(default_factory=list)

    @property
    def fakes(self) -> list[FakeUpstream]:
        return [port.fake for port in self.ports]

    @property
    def urls(self) -> list[str]:
        return [port.url for port in self.ports]

    def posts(self) -> list[int]:
        """POSTs each fake has received so far, in pool order."""
        return [fake.total_posts for fake in self.fakes]


__all__ = [
    "ANSWER",
    "CHAT",
    "COMPLETION",
    "COMPLETIONS",
    "PATHS",
    "TEXT",
    "FakePool",
    "FakeUpstream",
    "Mode",
    "Play",
    "Script",
    "SwitchablePort",
    "TLSMaterial",
    "answer",
    "final_events",
    "http_error",
    "in_stream",
    "sse",
    "text_events",
]
