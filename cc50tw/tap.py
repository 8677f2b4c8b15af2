"""
``twistd cc50``: options, and the service tree they build.

The service is a ``MultiService``: the backend starts first (compiling its
kernel, checking its upstream), then one ``StreamServerEndpointService`` per
``--listen``, so ``tcp:``, ``unix:`` and ``ssl:`` endpoints come for free.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from cc50tw.backends import Repeatable, installed_backends, repeatableOptions
from cc50tw.endpoints import server_description
from cc50tw.interfaces import IBackend, IBackendFactory
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
        if not 0 < number < float("inf"):
            raise ValueError(f"--{name} must be a positive number of seconds, got {value}")
        return number

    return parse


def _nonNegativeSeconds(name: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = float(value)
        if not number >= 0 or number == float("inf"):
            raise ValueError(f"--{name} must be 0 (off) or a positive number of seconds, got {value}")
        return number

    return parse


_SERVER_OPTIONS: list[list[Any]] = [
    ["backend", "b", "toy", "Backend that generates tokens (see the list below)."],
    ["max-tokens", None, 256, "Tokens generated when a request's max_tokens is 0.", _count("max-tokens")],
    ["max-tokens-limit", None, 1 << 24, "Largest max_tokens a request may ask for; more gets TOO_LARGE.", _count("max-tokens-limit")],
    ["max-frame-bytes", None, 1 << 20, "Largest frame payload accepted; larger frames get TOO_LARGE.", _count("max-frame-bytes")],
    ["max-inflight-per-connection", None, 256, "Requests in flight on one connection.", _count("max-inflight-per-connection")],
    ["max-connections", None, 10000, "Connections open at once; more are refused with OVERLOADED.", _count("max-connections")],
    ["max-concurrency", None, 1024, "Backend calls running at once, server-wide.", _count("max-concurrency")],
    ["max-queue", None, 4096, "Requests waiting for a backend slot; beyond it, OVERLOADED.", _count("max-queue")],
    ["idle-timeout", None, 300.0, "Seconds before a connection with nothing in flight is closed.", _seconds("idle-timeout")],
    ["stall-timeout", None, 60.0, "Seconds a request may be blocked by its client (no credit, unread socket) before CREDIT_STALL.", _seconds("stall-timeout")],
    ["max-request-seconds", None, 0.0, "Hard cap on one request's life in seconds (TIMEOUT past it); 0 = none.", _nonNegativeSeconds("max-request-seconds")],
    ["drain-timeout", None, 30.0, "On shutdown, seconds in-flight requests may take to finish.", _seconds("drain-timeout")],
    ["metrics", None, None, "Endpoint for /metrics, /healthz and /readyz over HTTP, e.g. tcp:9100:interface=127.0.0.1 (off by default)."],
    ["health-interval", None, 5.0, "Seconds between backend health checks.", _seconds("health-interval")],
    ["auth-token-file", None, None, "File holding a shared secret clients must send in HELLO (off by default)."],
    ["log-format", None, "text", "Log format: text, or json (one JSON object per line, on stdout)."],
]

_SERVER_FLAGS: list[list[Any]] = [
    ["quiet-requests", None, "Do not log one line per finished request (for benchmarks)."],
]


def _backend_help(specs: dict[str, IBackendFactory]) -> str:
    return "\n".join(f"  {name:<14}{spec.description}" for name, spec in sorted(specs.items()))


class _RepeatedParameter(usage.CoerceParameter):
    """Dispatches a ``Repeatable`` option: the first use replaces the default, each later one appends."""

    def __init__(self, options: usage.Options, coerce: Repeatable) -> None:
        super().__init__(options, coerce)
        self.given: set[str] = set()

    def dispatch(self, parameterName: str, value: str) -> None:
        if value is None:
            raise usage.UsageError(f"Parameter '{parameterName}' requires an argument.")
        try:
            coerced = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"Parameter type enforcement failed: {e}") from None
        if parameterName not in self.given:
            self.given.add(parameterName)
            self.options.opts[parameterName] = []
        self.options.opts[parameterName].append(coerced)


class Options(usage.Options):
    """Command-line options of ``twistd cc50``."""

    backends = installed_backends(
        {option[0] for option in _SERVER_OPTIONS} | {flag[0] for flag in _SERVER_FLAGS} | {"listen", "l", "help", "version"}
    )
    optParameters = _SERVER_OPTIONS + [option for spec in backends.values() for option in spec.options]
    optFlags = _SERVER_FLAGS + [flag for spec in backends.values() for flag in getattr(spec, "flags", ())]
    #: Backend options that may repeat, with their defaults: their values are lists.
    repeatable = repeatableOptions(optParameters)
    longdesc = (
        "Serve LLM token streams over the CC50 binary protocol. "
        "--listen takes a Twisted endpoint description (tcp:9199, "
        "tcp:9199:interface=127.0.0.1, unix:/run/cc50.sock, ssl:...) or "
        "HOST:PORT as the C++ tools do; it may repeat. Default: " + DEFAULT_LISTEN + "."
    )

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        for name in self.repeatable:
            coerce = self._dispatch[name].coerce
            self._dispatch[name] = _RepeatedParameter(self, coerce)

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
        for name, default in self.repeatable.items():
            if not isinstance(self[name], list):  # not given: the default alone
                self[name] = [] if default is None else [default]
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")
        if self["log-format"] == "json" and self.parent is not None and not self.parent.get("logger"):
            # twistd resolves --logger after its subcommand's options, so
            # naming our observer factory here is enough to switch format.
            self.parent["logger"] = "cc50tw.logs.jsonObserver"
        self.authToken = None
        if self["auth-token-file"]:
            try:
                with open(self["auth-token-file"], "rb") as tokenFile:
                    self.authToken = tokenFile.read().strip()
            except OSError as e:
                raise usage.UsageError(f"cannot read --auth-token-file: {e}") from None
            if not self.authToken:
                raise usage.UsageError(f"--auth-token-file {self['auth-token-file']} is empty")
        if self["metrics"]:
            self["metrics"] = server_description(self["metrics"])
        if self["max-tokens"] > self["max-tokens-limit"]:
            raise usage.UsageError("--max-tokens cannot exceed --max-tokens-limit")
        self._checkEndpoints()
        self.backend = self._buildBackend()

    def _buildBackend(self) -> IBackend:
        """Build it now, so a bad backend option fails twistd with a message, not a traceback."""
        from twisted.internet import reactor

        spec = self.backends[self["backend"]]
        try:
            return spec.build(self, reactor)
        except Exception as e:
            raise usage.UsageError(f"backend {spec.name!r} cannot start: {e}") from None

    def _checkEndpoints(self) -> None:
        from twisted.internet import reactor

        for option, descriptions in (("listen", self["listen"]), ("metrics", [self["metrics"]] if self["metrics"] else [])):
            for description in descriptions:
                try:
                    serverFromString(reactor, description)
                except Exception as e:
                    raise usage.UsageError(f"bad --{option} {description!r}: {e}") from None

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
            max_request_seconds=self["max-request-seconds"],
            max_tokens_limit=self["max-tokens-limit"],
            auth_token=self.authToken,
            log_requests=not self["quiet-requests"],
        )


def raiseFileLimit(log: Logger) -> None:
    """
    Each connection is a file descriptor, and the usual soft limit (1024) is
    far below what one cc50 process can hold; raise it to the hard limit.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.info("could not raise the open-file limit from {soft}: {error}", soft=soft, error=e)
            return
        log.info("raised the open-file limit (RLIMIT_NOFILE) from {soft} to {hard}", soft=soft, hard=hard)
    else:
        log.info("open-file limit (RLIMIT_NOFILE) is {soft}", soft=soft)


class CC50Service(MultiService):
    """
    Starts the backend before the listeners and stops it after them; on stop,
    drains in-flight requests before closing connections.
    """

    log = Logger()

    def __init__(
        self,
        backend: IBackend,
        factory: CC50ServerFactory,
        descriptions: list[str],
        reactor: Any,
        drainTimeout: float = 30.0,
        metricsDescription: str | None = None,
        healthInterval: float = 5.0,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.factory = factory
        self.descriptions = descriptions
        self.drainTimeout = drainTimeout
        self.reactor = reactor
        self.listeners: list[StreamServerEndpointService] = []
        for description in descriptions:
            listener = StreamServerEndpointService(serverFromString(reactor, description), factory)
            # Fail twistd at start (non-zero exit) when a port cannot be bound,
            # rather than logging and serving nothing.
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.operations: StreamServerEndpointService | None = None
        if metricsDescription:
            from cc50tw.web import operationsSite

            self.operations = StreamServerEndpointService(
                serverFromString(reactor, metricsDescription), operationsSite(factory, self.isListening)
            )
            self.operations._raiseSynchronously = True
        self.healthCheck = TimerService(healthInterval, self.checkBackend)
        self.healthCheck.clock = reactor
        self.healthCheck.setServiceParent(self)

    def isListening(self) -> bool:
        return bool(self.running) and all(listener.running for listener in self.listeners)

    def checkBackend(self) -> Deferred[None]:
        checked: Deferred[bool] = maybeDeferred(self.backend.checkHealth)  # type: ignore[call-overload]

        def record(healthy: object) -> None:
            healthy = healthy is True
            if healthy != self.factory.backendHealthy:
                self.log.info(
                    "backend {name!r} is now {state}", name=self.backend.name, state="healthy" if healthy else "unhealthy"
                )
            self.factory.backendHealthy = healthy

        def failed(failure: Failure) -> None:
            self.log.info("backend health check failed: {error}", error=failure.getErrorMessage())
            record(False)

        return checked.addCallbacks(record, failed)

    def privilegedStartService(self) -> None:
        raiseFileLimit(self.log)
        self.log.info("cc50 backend: {backend}", backend=self.backend.describe())
        result = self.backend.startBackend()
        if isinstance(result, Deferred):
            result.addErrback(lambda f: self.log.failure("backend failed to start", f))
        try:
            if self.operations is not None:
                self.operations.privilegedStartService()
            super().privilegedStartService()
        except CannotListenError as e:
            # One clear line and a non-zero exit, not a traceback.
            raise SystemExit(f"cc50: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}") from None

    def startService(self) -> None:
        super().startService()
        if self.operations is not None:
            self.operations.startService()
        self.log.info(
            "cc50 serving backend {name!r} on {endpoints}", name=self.backend.name, endpoints=", ".join(self.descriptions)
        )

    async def _stop(self) -> None:
        # Stop accepting first, so no connection arrives during the drain.
        await maybeDeferred(super().stopService)
        self.log.info("cc50 stopped listening; draining")
        await self.factory.shutdown(self.drainTimeout)
        if self.operations is not None:
            await maybeDeferred(self.operations.stopService)
        result = self.backend.stopBackend()
        if isinstance(result, Deferred):
            await result
        self.log.info("cc50 stopped")
        # twistd re-raises the signal that stopped it, so the process would
        # die of SIGTERM even after a clean drain; a drained stop is a
        # success, and exits 0 (what systemd and orchestrators expect).
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    backend = options.backend
    factory = CC50ServerFactory(backend, options.serverConfig(), reactor)
    return CC50Service(
        backend,
        factory,
        options["listen"],
        reactor,
        drainTimeout=options["drain-timeout"],
        metricsDescription=options["metrics"],
        healthInterval=options["health-interval"],
    )
