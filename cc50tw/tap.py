"""
``twistd cc50``: options, and the service tree they build.

The service is a ``MultiService``: the backend starts first (compiling its
kernel, checking its upstream), then one ``StreamServerEndpointService`` per
``--listen``, so ``tcp:``, ``unix:`` and ``ssl:`` endpoints come for free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from cc50tw.backends import BackendSpec, builtin_backends
from cc50tw.endpoints import server_description
from cc50tw.interfaces import IBackend
from cc50tw.server import CC50ServerFactory, ServerConfig

DEFAULT_LISTEN = "tcp:9199"


def _count(name: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if number < 1:
            raise ValueError(f"--{name} must be at least 1, got {number}")
        return number

    return parse


def _seconds(name: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = float(value)
        if number <= 0:
            raise ValueError(f"--{name} must be a positive number of seconds, got {value}")
        return number

    return parse


_SERVER_OPTIONS: list[list[Any]] = [
    ["backend", "b", "toy", "Backend that generates tokens (see the list below)."],
    ["max-tokens", None, 256, "Tokens generated when a request's max_tokens is 0.", _count("max-tokens")],
    ["max-frame-bytes", None, 1 << 20, "Largest frame payload accepted; larger frames get TOO_LARGE.", _count("max-frame-bytes")],
    ["max-inflight-per-connection", None, 256, "Requests in flight on one connection.", _count("max-inflight-per-connection")],
    ["max-connections", None, 10000, "Connections open at once; more are refused with OVERLOADED.", _count("max-connections")],
    ["max-concurrency", None, 1024, "Backend calls running at once, server-wide.", _count("max-concurrency")],
    ["max-queue", None, 4096, "Requests waiting for a backend slot; beyond it, OVERLOADED.", _count("max-queue")],
    ["idle-timeout", None, 300.0, "Seconds before a connection with nothing in flight is closed.", _seconds("idle-timeout")],
    ["stall-timeout", None, 60.0, "Seconds a request may wait for REQ_CREDIT before it is ended.", _seconds("stall-timeout")],
]


def _backend_help(specs: dict[str, BackendSpec]) -> str:
    return "\n".join(f"  {name:<14}{spec.description}" for name, spec in sorted(specs.items()))


class Options(usage.Options):
    """Command-line options of ``twistd cc50``."""

    backends = builtin_backends()
    optParameters = _SERVER_OPTIONS + [option for spec in backends.values() for option in spec.options]
    longdesc = (
        "Serve LLM token streams over the CC50 binary protocol. "
        "--listen takes a Twisted endpoint description (tcp:9199, "
        "tcp:9199:interface=127.0.0.1, unix:/run/cc50.sock, ssl:...) or "
        "HOST:PORT as the C++ tools do; it may repeat. Default: " + DEFAULT_LISTEN + "."
    )

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def getUsage(self, width: int | None = None) -> str:
        return super().getUsage(width) + "\nBackends (--backend):\n" + _backend_help(self.backends) + "\n"

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on (repeatable): tcp:PORT, unix:PATH, ssl:..., or HOST:PORT."""
        self["listen"].append(server_description(description))

    opt_l = opt_listen

    def postOptions(self) -> None:
        if self["backend"] not in self.backends:
            raise usage.UsageError(
                f"unknown backend {self['backend']!r}; installed backends: {', '.join(sorted(self.backends))}"
            )
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        from twisted.internet import reactor

        for description in self["listen"]:
            try:
                serverFromString(reactor, description)
            except Exception as e:
                raise usage.UsageError(f"bad --listen {description!r}: {e}") from None

    def serverConfig(self) -> ServerConfig:
        return ServerConfig(
            default_max_tokens=self["max-tokens"],
            max_frame_bytes=self["max-frame-bytes"],
            max_inflight_per_connection=self["max-inflight-per-connection"],
            max_connections=self["max-connections"],
            max_concurrency=self["max-concurrency"],
            max_queue=self["max-queue"],
            idle_timeout=self["idle-timeout"],
            stall_timeout=self["stall-timeout"],
        )


class CC50Service(MultiService):
    """Starts the backend before the listeners, and stops it after them."""

    log = Logger()

    def __init__(self, backend: IBackend, factory: CC50ServerFactory, descriptions: list[str], reactor: Any) -> None:
        super().__init__()
        self.backend = backend
        self.factory = factory
        self.descriptions = descriptions
        for description in descriptions:
            listener = StreamServerEndpointService(serverFromString(reactor, description), factory)
            # Fail twistd at start (non-zero exit) when a port cannot be bound,
            # rather than logging and serving nothing.
            listener._raiseSynchronously = True
            listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        self.log.info("cc50 backend: {backend}", backend=self.backend.describe())
        result = self.backend.startBackend()
        if isinstance(result, Deferred):
            result.addErrback(lambda f: self.log.failure("backend failed to start", f))
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "cc50 serving backend {name!r} on {endpoints}", name=self.backend.name, endpoints=", ".join(self.descriptions)
        )

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = maybeDeferred(super().stopService)  # type: ignore[arg-type]
        stopped.addCallback(lambda _: self.backend.stopBackend())
        return stopped


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    spec = options.backends[options["backend"]]
    try:
        backend = spec.build(options, reactor)
    except Exception as e:
        raise usage.UsageError(f"backend {spec.name!r} could not start: {e}") from None
    factory = CC50ServerFactory(backend, options.serverConfig(), reactor)
    return CC50Service(backend, factory, options["listen"], reactor)
