"""
``twistd cc50``: options, and the service tree they build.

The service is a ``MultiService``: the backend starts first (compiling its
kernel, checking its upstream), then one ``StreamServerEndpointService`` per
``--listen``, so ``tcp:``, ``unix:`` and ``ssl:`` endpoints come for free.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from cc50tw.backends import Repeatable, discoverBackends, optionNames, repeatableOptions
from cc50tw.endpoints import server_description
from cc50tw.interfaces import IBackend, IBackendFactory
from cc50tw.server import CC50ServerFactory, ServerConfig

DEFAULT_LISTEN = "tcp:9199"

#: cc50tw's own backends, in the order ``--help`` lists their options.
_BUILTIN_ORDER = ("toy", "llama_server", "openai")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cc50tw")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _count(name: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"--{name} must be a whole number, got {value!r}") from None
        if number < 1:
            raise ValueError(f"--{name} must be at least 1, got {number}")
        return number

    return parse


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--{name} must be a number of seconds, got {value!r}") from None


def _seconds(name: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = _float(name, value)
        if not 0 < number < float("inf"):
            raise ValueError(f"--{name} must be a positive number of seconds, got {value}")
        return number

    return parse


def _nonNegativeSeconds(name: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = _float(name, value)
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
    ["config", None, None, "TOML file setting any option by its long name, and [[upstreams]] routed by model "
     "(docs/operations.md); the command line wins."],
]

_SERVER_FLAGS: list[list[Any]] = [
    ["quiet-requests", None, "Do not log one line per finished request (for benchmarks)."],
]


def _backend_help(specs: dict[str, IBackendFactory]) -> str:
    return "\n".join(f"  {name:<14}{spec.description}" for name, spec in sorted(specs.items()))


def _badValue(parameterName: str, value: str, error: ValueError) -> usage.UsageError:
    """
    A usage error that names the option and the value given.

    ``usage.CoerceParameter`` says only "Parameter type enforcement failed:
    must be >= 0, got -5", which leaves the user to guess which of a dozen
    options was wrong.
    """
    text = str(error)
    if f"--{parameterName}" in text:
        return usage.UsageError(text)
    if text.startswith("invalid literal for int()"):
        text = "must be a whole number"
    elif text.startswith("could not convert string to float"):
        text = "must be a number"
    return usage.UsageError(f"--{parameterName}={value}: {text}")


class _NamedParameter(usage.CoerceParameter):
    """A coerced option whose errors name the option (``--toy-iters=-5: must be >= 0``)."""

    def dispatch(self, parameterName: str, value: str) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} requires a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise _badValue(parameterName, value, e) from None


class _RepeatedParameter(usage.CoerceParameter):
    """Dispatches a ``Repeatable`` option: the first use replaces the default, each later one appends."""

    def __init__(self, options: usage.Options, coerce: Repeatable) -> None:
        super().__init__(options, coerce)
        self.given: set[str] = set()

    def dispatch(self, parameterName: str, value: str) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} requires a value")
        try:
            coerced = self.coerce(value)
        except ValueError as e:
            raise _badValue(parameterName, value, e) from None
        if parameterName not in self.given:
            self.given.add(parameterName)
            self.options.opts[parameterName] = []
        self.options.opts[parameterName].append(coerced)


class Options(usage.Options):
    """Command-line options of ``twistd cc50``."""

    discovery = discoverBackends(
        {option[0] for option in _SERVER_OPTIONS} | {flag[0] for flag in _SERVER_FLAGS} | {"listen", "l", "help", "version"}
    )
    backends = discovery.backends
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
        for name, dispatcher in list(self._dispatch.items()):
            if name in self.repeatable:
                self._dispatch[name] = _RepeatedParameter(self, dispatcher.coerce)
            elif type(dispatcher) is usage.CoerceParameter:
                self._dispatch[name] = _NamedParameter(self, dispatcher.coerce)

    def opt_version(self) -> None:
        """Display cc50tw's version (and Twisted's) and exit."""
        from twisted import copyright

        print(f"cc50tw {_version()} (Twisted {copyright.version})")
        sys.exit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Under twistd (or twist), report a usage error in three lines on stderr and exit 2.

        twistd's own handling prints the whole ``--help`` text first, on
        stdout, and then the error after the name of its first argument;
        the one line that matters was buried under a hundred others.
        Parsed on its own (tests, tools), the ``UsageError`` is raised as usual.
        """
        try:
            from cc50tw.config import applyConfigFile

            applyConfigFile(self, sys.argv[1:] if options is None else options)
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            command = f"{self._programName()} cc50"
            sys.stderr.write(f"usage: {command} [options]\n{command}: error: {e}\nRun '{command} --help' for every option.\n")
            sys.stderr.flush()
            raise SystemExit(2) from None

    @staticmethod
    def _programName() -> str:
        name = os.path.basename(sys.argv[0]) if sys.argv else ""
        return "twist" if name == "twist" else "twistd"

    def _optionDicts(self) -> dict[str, dict[str, Any]]:
        """Each option as ``usage.docMakeChunks`` wants it, by long name (as ``Options.getUsage`` builds them)."""
        shortNames = {long: short for short, long in self.synonyms.items() if short != long and len(short) == 1}
        dicts: dict[str, dict[str, Any]] = {}
        for opt in self.longOpt:
            parameter = opt.endswith("=")
            name = opt[:-1] if parameter else opt
            dicts[name] = {
                "long": name,
                "short": shortNames.get(name),
                "doc": self.docs[name],
                "optType": "parameter" if parameter else "flag",
                "default": self.defaults.get(name, None),
                "dispatch": self._dispatch.get(name, None),
            }
        return dicts

    def _orderedBackends(self) -> list[IBackendFactory]:
        builtin = [self.backends[name] for name in _BUILTIN_ORDER if name in self.backends]
        return builtin + [spec for name, spec in sorted(self.backends.items()) if name not in _BUILTIN_ORDER]

    def getUsage(self, width: int | None = None) -> str:
        """
        The options grouped: the server's, then each backend's under its name.

        One alphabetical list of ~60 options mixed ``--llama-backoff`` with
        ``--max-queue``; only the server's options and the chosen backend's
        matter to a given run.
        """
        width = width or int(os.environ.get("COLUMNS", "80"))
        dicts = self._optionDicts()

        def section(title: str, names: Iterable[str]) -> str:
            chosen = [dicts.pop(name) for name in sorted(names) if name in dicts]
            return f"{title}:\n" + ("".join(usage.docMakeChunks(chosen, width)) if chosen else "  (none)\n")

        serverNames = {option[0] for option in _SERVER_OPTIONS} | {flag[0] for flag in _SERVER_FLAGS}
        parts = [section("Server options", serverNames | {"listen", "help", "version"})]
        for spec in self._orderedBackends():
            parts.append(section(f"{spec.name} backend options (--backend={spec.name})", optionNames(spec)))
        if dicts:  # anything no group claimed, so that --help never hides an option
            parts.append(section("Other options", list(dicts)))
        longdesc = "\n".join(textwrap.wrap(self.longdesc, width))
        text = "\n".join(parts) + "\n" + longdesc + "\n\nBackends (--backend):\n" + _backend_help(self.backends) + "\n"
        if self.discovery.problems:
            # Else a plugin that failed to import is simply missing from the list, with no hint why.
            text += "\nBackend plugins that failed to load:\n" + "".join(
                f"  {problem}\n" for problem in self.discovery.problems
            )
        return text

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on (repeatable): tcp:PORT, unix:PATH, ssl:..., or HOST:PORT."""
        self["listen"].append(server_description(description))

    opt_l = opt_listen

    def postOptions(self) -> None:
        if self["backend"] not in self.backends:
            problems = "".join(f"; {problem}" for problem in self.discovery.problems)
            raise usage.UsageError(
                f"unknown backend {self['backend']!r}; installed backends: {', '.join(sorted(self.backends))}{problems}"
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
        elif self["log-format"] == "text" and self.parent is not None and self._ownsTextLog(self.parent):
            # The same observer on the same file as twistd's own, made by
            # cc50tw so that request lines can be written there in batches.
            from cc50tw.logs import useTwistdLogOptions

            useTwistdLogOptions(self.parent.get("logfile"), bool(self.parent.get("nodaemon")))
            self.parent["logger"] = "cc50tw.logs.textObserver"
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

    @staticmethod
    def _ownsTextLog(parent: usage.Options) -> bool:
        """
        Whether ``textObserver`` can stand in for twistd's own text log: under
        twistd on a POSIX system, when neither ``--logger`` nor ``--syslog``
        asks for something else.  Elsewhere (``twist``, Windows) the log is
        left as it is, and request lines stay ordinary events.
        """
        return (
            os.name == "posix"
            and "nodaemon" in parent
            and "logfile" in parent
            and not parent.get("logger")
            and not parent.get("syslog")
        )

    def _buildBackend(self) -> IBackend:
        """
        Build it now, so a bad backend option fails twistd with a message, not a traceback.

        A ``ValueError`` is how a backend says an option is wrong, and
        ``CUDAUnavailable`` how the toy backend says ``--toy-device=cuda``
        cannot run here: a usage error (exit 2).  Anything else is a bug in
        the backend, whose author needs the stack: under twistd it is printed
        with the traceback and exits 1; parsed on its own (tests, tools), it
        propagates.
        """
        from twisted.internet import reactor

        from cc50tw.backends.cuda import CUDAUnavailable

        spec = self.backends[self["backend"]]
        try:
            return spec.build(self, reactor)
        except (ValueError, CUDAUnavailable) as e:
            raise usage.UsageError(f"backend {spec.name!r} cannot start: {e}") from None
        except Exception:
            if self.parent is None:
                raise
            import traceback

            module = getattr(spec.build, "__module__", "?")
            sys.stderr.write(
                f"{self._programName()} cc50: backend {spec.name!r} ({module}) failed to build, "
                f"a bug in the backend:\n{traceback.format_exc()}"
            )
            sys.stderr.flush()
            raise SystemExit(1) from None

    def _checkEndpoints(self) -> None:
        from twisted.internet import reactor

        for option, descriptions in (("listen", self["listen"]), ("metrics", [self["metrics"]] if self["metrics"] else [])):
            for description in descriptions:
                try:
                    endpoint = serverFromString(reactor, description)
                except TypeError as e:
                    if "multiple values for argument" not in str(e):
                        raise usage.UsageError(f"bad --{option} {description!r}: {e}") from None
                    # tcp:9199:interface=::1 splits at every colon, so "::1" becomes extra
                    # positional arguments; Twisted's own message names a private function.
                    raise usage.UsageError(
                        f"bad --{option} {description!r}: a colon inside a value must be escaped, as in "
                        r"tcp:PORT:interface=\:\:1 (quote it for the shell), or write [::1]:PORT"
                    ) from None
                except Exception as e:
                    raise usage.UsageError(f"bad --{option} {description!r}: {e}") from None
                port = getattr(_innermost(endpoint), "_port", None)
                if isinstance(port, int) and not 0 <= port <= 65535:
                    raise usage.UsageError(f"bad --{option} {description!r}: port {port} is not between 0 and 65535")

    def startupReport(self) -> tuple[int | None, str | None]:
        """
        Where ``CC50Service`` reports a failure to start: a copy of stderr, and the pidfile.

        A daemonizing twistd points stderr at /dev/null before the service
        starts, and its status pipe only carries an ``Exception``'s first 100
        bytes; stderr is copied here, while it is still the terminal, so the
        failure's own message reaches the person who ran the command.
        """
        parent = self.parent
        if parent is None:
            return None, None
        pidfile = parent.get("pidfile") or None
        if parent.get("nodaemon", True):
            return None, pidfile
        try:
            return os.dup(2), pidfile
        except OSError:
            return None, pidfile

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


def _innermost(endpoint: object) -> object:
    """The endpoint under wrappers such as ``haproxy:``."""
    for _ in range(8):
        inner = getattr(endpoint, "_wrappedEndpoint", None)
        if inner is None:
            break
        endpoint = inner
    return endpoint


def exposedWithoutProtection(endpoint: object) -> str | None:
    """
    The address a plain-TCP ``endpoint`` serves beyond this host, or ``None``.

    TLS endpoints (``ssl:``, ``mtls:``) and Unix sockets are not "exposed" in
    this sense, nor is an interface on the loopback network.
    """
    endpoint = _innermost(endpoint)
    if isinstance(endpoint, SSL4ServerEndpoint) or not isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint):
        return None
    interface = str(getattr(endpoint, "_interface", "") or "")
    if interface.lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback:
            return None
    except ValueError:  # "" (every interface), or a host name
        pass
    port = getattr(endpoint, "_port", "?")
    return f"{interface or ('::' if isinstance(endpoint, TCP6ServerEndpoint) else '0.0.0.0')}:{port}"


def _portOf(endpoint: object) -> object:
    """The port an endpoint (under any wrapper) listens on, ``"PORT"`` when it has none."""
    return getattr(_innermost(endpoint), "_port", "PORT")


def _failedAddress(error: CannotListenError | OSError, description: str | None) -> str:
    """
    What could not be listened on, and why, for ``cannot listen on ...``.

    ``CannotListenError`` names a TCP port as ``interface:port``; for a Unix
    socket its "port" is the path, as bytes, which read as ``*:b'/path'``.
    """
    if isinstance(error, CannotListenError):
        port = error.port
        if isinstance(port, bytes | str) and not str(port).isdigit():
            return f"unix:{os.fsdecode(port)}: {error.socketError}"
        return f"{error.interface or '*'}:{port}: {error.socketError}"
    where = description or (os.fsdecode(error.filename) if error.filename is not None else "?")
    return f"{where}: {error.strerror or error}"


class StartupError(Exception):
    """
    The service could not start (a port in use).

    An ``Exception``, not ``SystemExit``: a daemonizing twistd reports only
    exceptions through its status pipe (and removes its pidfile); a
    ``SystemExit`` left the waiting parent blocked for ever.
    """


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
        authenticated: bool = False,
        startupStderr: int | None = None,
        pidfile: str | None = None,
        pluginProblems: Sequence[str] = (),
    ) -> None:
        super().__init__()
        #: Backend plugins that failed to load (``Discovery.problems``), warned about at start.
        self.pluginProblems = list(pluginProblems)
        self.backend = backend
        self.metricsDescription = metricsDescription
        self.authenticated = authenticated
        #: A copy of the terminal's stderr when twistd daemonizes (see ``Options.startupReport``).
        self.startupStderr = startupStderr
        self.pidfile = pidfile
        self.factory = factory
        self.descriptions = descriptions
        self.drainTimeout = drainTimeout
        self.reactor = reactor
        self.listeners: list[StreamServerEndpointService] = []
        #: What each listening service was asked for, to name it when it cannot listen.
        self.listenDescriptions: dict[IService, str] = {}
        self.endpoints = [serverFromString(reactor, description) for description in descriptions]
        for listener_endpoint in self.endpoints:
            listener = StreamServerEndpointService(listener_endpoint, factory)
            # Fail twistd at start (non-zero exit) when a port cannot be bound,
            # rather than logging and serving nothing.
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            self.listeners.append(listener)
        for listener, description in zip(self.listeners, descriptions):
            self.listenDescriptions[listener] = description
        self.operations: StreamServerEndpointService | None = None
        self.metricsEndpoint: object = None
        if metricsDescription:
            from cc50tw.web import operationsSite

            self.metricsEndpoint = serverFromString(reactor, metricsDescription)
            self.operations = StreamServerEndpointService(
                self.metricsEndpoint, operationsSite(factory, self.isListening)
            )
            self.operations._raiseSynchronously = True
            self.listenDescriptions[self.operations] = metricsDescription
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
        self._holdStopSignalsUntilRunning()
        raiseFileLimit(self.log)
        self.log.info("cc50 backend: {backend}", backend=self.backend.describe())
        result = self.backend.startBackend()
        if isinstance(result, Deferred):
            result.addErrback(lambda f: self.log.failure("backend failed to start", f))
        # MultiService.privilegedStartService, one child at a time, so that a
        # failure names the endpoint that failed.
        for child in [self.operations, *self]:
            if child is None:
                continue
            try:
                child.privilegedStartService()
            except (CannotListenError, OSError) as e:
                # OSError: a unix: socket in a directory that does not exist fails
                # in Twisted's lock file, before any CannotListenError.
                self._failToStart(f"cc50: cannot listen on {_failedAddress(e, self.listenDescriptions.get(child))}")

    def _holdStopSignalsUntilRunning(self) -> None:
        """
        twistd opens the ports here, before the reactor runs and takes
        SIGTERM and SIGINT over, so a supervisor that stops a server as soon
        as it answers would kill it outright (exit -15, no orderly stop).
        Until the reactor runs, those signals are noted; once it runs, one
        that came stops it in order.  Where the reactor installs no handlers
        of its own, the ones from before are put back.
        """
        if getattr(self.reactor, "running", False):
            return  # the reactor's own handlers are in place already
        held: list[int] = []

        def hold(number: int, frame: object) -> None:
            held.append(number)

        previous: dict[int, Any] = {}
        try:
            for stopSignal in (signal.SIGTERM, signal.SIGINT):
                previous[stopSignal] = signal.signal(stopSignal, hold)
        except ValueError:  # not the main thread: nothing to hold
            for number, handler in previous.items():
                signal.signal(number, handler)
            return

        def running() -> None:
            for number, handler in previous.items():
                if signal.getsignal(number) is hold:
                    signal.signal(number, handler)
            if held:
                self.log.info("cc50: a stop signal came while starting; stopping")
                self.reactor.stop()

        self.reactor.callWhenRunning(running)

    def _failToStart(self, message: str) -> None:
        """
        End a start that cannot succeed: one clear line, a non-zero exit, no stale pidfile.

        In the foreground that is the line on stderr (and in the log) and a
        ``SystemExit`` (no traceback), after removing the pidfile, which
        twistd removes only for an ``Exception``.
        Daemonizing, the line goes to the saved stderr and a ``StartupError``
        goes to twistd, which sends it down its status pipe to the waiting
        parent (exit 1) and removes the pidfile itself.
        """
        self.log.error("{message}", message=message)
        result = self.backend.stopBackend()  # no worker thread may keep the failed process alive
        if isinstance(result, Deferred):
            result.addErrback(lambda f: None)
        if self.startupStderr is not None:
            try:
                os.write(self.startupStderr, (message + "\n").encode("utf-8", "replace"))
                os.close(self.startupStderr)
            except OSError:
                pass
            self.startupStderr = None
            raise StartupError(message)
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
        # twistd has pointed sys.stderr at the log; the terminal should see this line too.
        stderr = sys.__stderr__
        if stderr is not None:
            stderr.write(message + "\n")
            stderr.flush()
        raise SystemExit(1)

    def startService(self) -> None:
        super().startService()
        if self.operations is not None:
            self.operations.startService()
        if self.startupStderr is not None:  # started: the failure report is not needed
            os.close(self.startupStderr)
            self.startupStderr = None
        self.log.info(
            "cc50 serving backend {name!r} on {endpoints}{metrics}",
            name=self.backend.name,
            endpoints=", ".join(self.descriptions),
            metrics=f"; metrics on {self.metricsDescription}" if self.metricsDescription else "",
        )
        self.warnIfExposed()
        self.warnOfPluginProblems()

    def warnOfPluginProblems(self) -> None:
        """
        Name the backend plugins that failed to load.

        They are simply missing from the backends; without this line the
        log gives no hint why a plugin someone installed is not there.
        """
        for problem in self.pluginProblems:
            self.log.warn("backend plugin not loaded: {problem}", problem=problem)

    def warnIfExposed(self) -> None:
        """
        Warn when plain TCP on a non-loopback address has no authentication.

        The default ``--listen=tcp:9199`` binds every interface: fine on a
        private network or in a container, but then anyone who can reach the
        port can spend the backend's GPU time.  The metrics endpoint is
        warned about whatever ``--auth-token-file`` says: the token guards
        CC50 connections, never ``/metrics`` and ``/readyz``.
        """
        if not self.authenticated:
            exposed = [
                (address, endpoint) for endpoint in self.endpoints if (address := exposedWithoutProtection(endpoint))
            ]
            if exposed:
                self.log.warn(
                    "cc50 is serving {addresses} beyond this host with no authentication: anyone who can reach "
                    "it can use the backend. Use --auth-token-file, TLS (ssl: or mtls:), or "
                    "--listen=tcp:{port}:interface=127.0.0.1 for this host only.",
                    addresses=", ".join(address for address, _ in exposed),
                    port=_portOf(exposed[0][1]),
                )
        metrics = exposedWithoutProtection(self.metricsEndpoint) if self.metricsEndpoint is not None else None
        if metrics is not None:
            self.log.warn(
                "cc50 is serving /metrics, /healthz and /readyz on {address} beyond this host, without "
                "authentication: anyone who can reach it can read them. Use "
                "--metrics=tcp:{port}:interface=127.0.0.1 for this host only, or keep the port behind a firewall.",
                address=metrics,
                port=_portOf(self.metricsEndpoint),
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
    startupStderr, pidfile = options.startupReport()
    return CC50Service(
        backend,
        factory,
        options["listen"],
        reactor,
        drainTimeout=options["drain-timeout"],
        metricsDescription=options["metrics"],
        healthInterval=options["health-interval"],
        authenticated=options.authToken is not None,
        startupStderr=startupStderr,
        pidfile=pidfile,
        pluginProblems=options.discovery.problems,
    )
