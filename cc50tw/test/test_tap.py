"""
``twistd cc50``'s options and start-up, for issue #16: usage errors that
name the option, grouped ``--help``, backend discovery that says why a
plugin is missing, and a failed start that ends the process cleanly.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import cc50tw.plugins
from cc50tw.backends import BackendSpec, Discovery, discoverBackends
from cc50tw.interfaces import IBackend
from cc50tw.server import CC50ServerFactory, ServerConfig
from cc50tw.tap import CC50Service, Options, StartupError
from cc50tw.test.fakes import ManualBackend, make_factory


class UsageErrorTests(SynchronousTestCase):
    def error(self, *argv: str) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(list(argv))
        return str(caught.exception)

    def test_badValuesNameTheOption(self) -> None:
        self.assertEqual(self.error("--toy-iters=-5"), "--toy-iters=-5: must be >= 0, got -5")
        self.assertIn("--max-frame-bytes must be a whole number, got 'abc'", self.error("--max-frame-bytes=abc"))
        self.assertIn("--drain-timeout", self.error("--drain-timeout=later"))

    def test_portOutOfRangeIsAUsageError(self) -> None:
        self.assertIn("port 70000 is not between 0 and 65535", self.error("--listen=tcp:70000"))
        self.assertIn("--metrics", self.error("--listen=tcp:0:interface=127.0.0.1", "--metrics=99999"))

    def test_underTwistdThreeLinesOnStderrAndExit2(self) -> None:
        options = Options()
        options.parent = usage.Options()
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--toy-iters=-5"])
        self.assertEqual(caught.exception.code, 2)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(lines[0], "usage: twistd cc50 [options]")
        self.assertIn("--toy-iters=-5", lines[1])
        self.assertIn("--help", lines[2])
        self.assertEqual(len(lines), 3)


class HelpTests(SynchronousTestCase):
    def test_groupedByBackend(self) -> None:
        text = Options().getUsage(width=100)
        server, rest = text.split("toy backend options (--backend=toy):")
        toy, rest = rest.split("llama_server backend options (--backend=llama_server):")
        llama, openai = rest.split("openai backend options (--backend=openai):")
        self.assertIn("--max-queue", server)
        self.assertIn("--listen", server)
        self.assertNotIn("--toy-iters", server)
        self.assertIn("--toy-iters", toy)
        self.assertIn("--llama-url", llama)
        self.assertIn("--openai-url", openai)
        self.assertNotIn("--llama-url", openai)

    def test_failedPluginsEndTheBackendList(self) -> None:
        """A plugin that failed to import was simply missing from ``--help``, with no hint why."""
        options = Options()
        problems = ["plugin module broken (/x/broken.py) failed to import: ModuleNotFoundError: nope", "second one"]
        options.discovery = Discovery(Options.backends, problems)
        text = options.getUsage(width=100)
        backends, failed = text.split("Backend plugins that failed to load:\n")
        self.assertIn("Backends (--backend):", backends)
        self.assertEqual(failed, "".join(f"  {problem}\n" for problem in problems))

    def test_noFailedPluginsNoSection(self) -> None:
        options = Options()
        options.discovery = Discovery(Options.backends, [])
        self.assertNotIn("failed to load", options.getUsage(width=100))

    def test_reasoningDefaultIsAChoiceNotABool(self) -> None:
        """The help read "Default: stream. [default: True]"; the default is now the choice itself."""
        text = " ".join(Options().getUsage(width=200).split())
        self.assertIn("stream|drop", text)
        self.assertNotIn("[default: True]", text)
        self.assertIn("[default: stream]", text)
        options = Options()
        options.parseOptions(["--backend=llama_server", "--llama-health-interval=0"])
        self.assertTrue(options.backend.settings.reasoning)  # type: ignore[attr-defined]
        options = Options()
        options.parseOptions(["--backend=llama_server", "--llama-health-interval=0", "--llama-reasoning=drop"])
        self.assertFalse(options.backend.settings.reasoning)  # type: ignore[attr-defined]


class EndpointHintTests(SynchronousTestCase):
    def test_unescapedIPv6InterfaceSaysHowToWriteIt(self) -> None:
        """``interface=::1`` gave "_parseTCP() got multiple values for argument 'interface'"."""
        for option in ("--listen", "--metrics"):
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions([f"{option}=tcp:0:interface=::1"])
            text = str(caught.exception)
            self.assertIn(option, text)
            self.assertIn(r"interface=\:\:1", text)
            self.assertIn("[::1]:PORT", text)
            self.assertNotIn("_parseTCP", text)

    def test_escapedOrBracketedIPv6IsAccepted(self) -> None:
        for listen in (r"tcp6:0:interface=\:\:1", "[::1]:0"):
            options = Options()
            options.parseOptions([f"--listen={listen}"])


class BackendBuildTests(SynchronousTestCase):
    """A ValueError from build() is a bad option (exit 2); anything else is the plugin's bug (exit 1, traceback)."""

    def options(self, error: Exception, parent: usage.Options | None = None) -> Options:
        def build(options: Mapping[str, Any], reactor: Any) -> IBackend:
            raise error

        options = Options()
        options.parent = parent
        options.backends = {"boom": BackendSpec("boom", "raises", [], build)}
        options["backend"] = "boom"
        return options

    def test_valueErrorIsAUsageError(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.options(ValueError("bad --boom-x"))._buildBackend()
        self.assertEqual(str(caught.exception), "backend 'boom' cannot start: bad --boom-x")

    def test_unexpectedErrorPropagatesOnItsOwn(self) -> None:
        self.assertRaises(KeyError, self.options(KeyError("oops"))._buildBackend)

    def test_unexpectedErrorUnderTwistdPrintsTheTracebackAndExits1(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            self.options(KeyError("oops"), parent=usage.Options())._buildBackend()
        self.assertEqual(caught.exception.code, 1)
        text = stderr.getvalue()
        self.assertIn("backend 'boom'", text)
        self.assertIn("Traceback (most recent call last):", text)
        self.assertIn("in build", text)  # the plugin's own frame, which its author needs
        self.assertIn("KeyError: 'oops'", text)


class DiscoveryTests(SynchronousTestCase):
    """A plugin that cannot be used says why, instead of vanishing."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()

    def addPath(self, path: Path) -> None:
        sys.path.insert(0, str(path))
        self.addCleanup(sys.path.remove, str(path))

    def test_pluginModuleThatFailsToImport(self) -> None:
        plugins = self.root / "cc50tw" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "cc50_unit_broken.py").write_text("import cc50_unit_no_such_module\n")
        cc50tw.plugins.__path__.append(str(plugins))
        self.addCleanup(cc50tw.plugins.__path__.remove, str(plugins))
        problems = discoverBackends().problems
        self.flushLoggedErrors(ModuleNotFoundError)  # getPlugins logs it too, where twistd has no log yet
        self.assertTrue(
            any("cc50_unit_broken" in p and "ModuleNotFoundError" in p and "cc50_unit_no_such_module" in p for p in problems),
            problems,
        )

    def writeDistribution(self, entryPoints: str, module: str) -> None:
        info = self.root / "cc50_unit_probe-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cc50-unit-probe\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[cc50tw.backends]\n{entryPoints}\n")
        (self.root / "cc50_unit_probe.py").write_text(module)
        self.addPath(self.root)
        self.addCleanup(sys.modules.pop, "cc50_unit_probe", None)

    def test_entryPointBackend(self) -> None:
        self.writeDistribution(
            "unitprobe = cc50_unit_probe:SPEC",
            "from cc50tw.backends import BackendSpec\n"
            "SPEC = BackendSpec('unitprobe', 'probe', [['unitprobe-x', None, 1, 'doc']], lambda options, reactor: None)\n",
        )
        discovery = discoverBackends()
        self.assertIn("unitprobe", discovery.backends)
        # Only about this probe: a broken third-party plugin installed in the
        # same environment has problems of its own, and must not fail this test.
        self.assertEqual([p for p in discovery.problems if "cc50_unit_probe" in p or "unitprobe" in p], [])

    def test_entryPointThatFailsOrClashes(self) -> None:
        self.writeDistribution(
            "broken = cc50_unit_probe:MISSING\nclash = cc50_unit_probe:SPEC",
            "from cc50tw.backends import BackendSpec\n"
            "SPEC = BackendSpec('clashprobe', 'probe', [['toy-iters', None, 1, 'doc']], lambda options, reactor: None)\n",
        )
        discovery = discoverBackends()
        self.assertNotIn("clashprobe", discovery.backends)
        text = "\n".join(discovery.problems)
        self.assertIn("entry point broken = cc50_unit_probe:MISSING failed to import: AttributeError", text)
        self.assertIn("'clashprobe'", text)
        self.assertIn("--toy-iters", text)


class FailedStartTests(SynchronousTestCase):
    """A port in use ends the start with one line and no pidfile, daemonized or not."""

    def setUp(self) -> None:
        self.busy = socket.socket()
        self.addCleanup(self.busy.close)
        self.busy.bind(("127.0.0.1", 0))
        self.busy.listen()
        self.port = self.busy.getsockname()[1]

    def service(self, **kwargs: object) -> CC50Service:
        from twisted.internet import reactor

        factory, _ = make_factory(ManualBackend())
        return CC50Service(factory.backend, factory, [f"tcp:{self.port}:interface=127.0.0.1"], reactor, **kwargs)  # type: ignore[arg-type]

    def test_daemonizedReportsOnSavedStderrAndRaisesAnException(self) -> None:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        service = self.service(startupStderr=write)
        with self.assertRaises(StartupError) as caught:
            service.privilegedStartService()
        self.assertIn(f"cannot listen on 127.0.0.1:{self.port}", str(caught.exception))
        self.assertIn(f"cannot listen on 127.0.0.1:{self.port}", os.read(read, 1000).decode())

    def test_foregroundRemovesThePidfileAndExits1(self) -> None:
        pidfile = Path(self.mktemp())
        pidfile.write_text(str(os.getpid()))
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        with self.assertRaises(SystemExit) as caught:
            self.service(pidfile=str(pidfile)).privilegedStartService()
        self.assertEqual(caught.exception.code, 1)
        self.assertFalse(pidfile.exists())
        self.assertIn(f"cannot listen on 127.0.0.1:{self.port}", stderr.getvalue())


class FailedUnixStartTests(SynchronousTestCase):
    """A Unix socket that cannot be made fails like a busy port, and is named as a path."""

    def start(self, description: str) -> str:
        from twisted.internet import reactor

        factory, _ = make_factory(ManualBackend())
        service = CC50Service(factory.backend, factory, [description], reactor)
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        self.assertEqual(caught.exception.code, 1)
        return stderr.getvalue()

    def test_missingDirectory(self) -> None:
        """It was a traceback: the lock file's FileNotFoundError is no ``CannotListenError``."""
        path = os.path.join(self.mktemp(), "cc50.sock")
        self.assertEqual(self.start(f"unix:{path}"), f"cc50: cannot listen on unix:{path}: No such file or directory\n")

    def test_pathInUse(self) -> None:
        """It read ``cannot listen on *:b'/path'``."""
        path = self.mktemp()
        taken = socket.socket(socket.AF_UNIX)
        self.addCleanup(taken.close)
        taken.bind(path)
        taken.listen()
        text = self.start(f"unix:{path}:lockfile=0")
        self.assertIn(f"cc50: cannot listen on unix:{path}: ", text)
        self.assertNotIn("b'", text)


class StartWarningTests(SynchronousTestCase):
    def start(self, descriptions: list[str], **kwargs: object) -> str:
        from twisted.internet.testing import MemoryReactorClock

        factory, _ = make_factory(ManualBackend())
        service = CC50Service(factory.backend, factory, descriptions, MemoryReactorClock(), **kwargs)  # type: ignore[arg-type]
        with capturedLogs() as events:
            service.startService()
        return "\n".join(formatEvent(event) for event in events)

    def test_pluginsThatFailedToLoadAreNamed(self) -> None:
        text = self.start(["tcp:9199:interface=127.0.0.1"], pluginProblems=["plugin module a failed", "entry point b"])
        self.assertIn("backend plugin not loaded: plugin module a failed", text)
        self.assertIn("backend plugin not loaded: entry point b", text)
        self.assertNotIn("not loaded", self.start(["tcp:9199:interface=127.0.0.1"]))

    def test_exposureAdviceUsesTheRealPort(self) -> None:
        """The advice said ``--listen=tcp:9199:...`` whatever the port."""
        text = self.start(["tcp:4321"])
        self.assertIn("0.0.0.0:4321 beyond this host", text)
        self.assertIn("--listen=tcp:4321:interface=127.0.0.1", text)

    def test_metricsOnEveryInterfaceWarns(self) -> None:
        """/metrics and /readyz are unauthenticated whatever --auth-token-file says."""
        for authenticated in (False, True):
            text = self.start(["tcp:9199:interface=127.0.0.1"], metricsDescription="tcp:9100", authenticated=authenticated)
            self.assertIn("/metrics, /healthz and /readyz on 0.0.0.0:9100 beyond this host", text)
            self.assertIn("--metrics=tcp:9100:interface=127.0.0.1", text)

    def test_metricsOnLoopbackDoesNotWarn(self) -> None:
        text = self.start(["tcp:9199:interface=127.0.0.1"], metricsDescription="tcp:9100:interface=127.0.0.1")
        self.assertNotIn("beyond this host", text)


class StopSignalWhileStartingTests(SynchronousTestCase):
    """A SIGTERM between twistd opening its ports and the reactor running is an orderly stop."""

    def service(self) -> tuple[CC50Service, Any]:
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        factory = CC50ServerFactory(ManualBackend(), ServerConfig(), reactor)
        return CC50Service(factory.backend, factory, ["tcp:0:interface=127.0.0.1"], reactor), reactor

    def test_heldUntilRunningThenStops(self) -> None:
        import signal

        before = signal.getsignal(signal.SIGTERM)
        service, reactor = self.service()
        service._holdStopSignalsUntilRunning()
        self.addCleanup(signal.signal, signal.SIGTERM, before)
        os.kill(os.getpid(), signal.SIGTERM)  # held, not fatal
        self.assertFalse(reactor.hasStopped)
        [(running, args, kwargs)] = reactor.whenRunningHooks
        running(*args, **kwargs)
        self.assertTrue(reactor.hasStopped)
        self.assertIs(signal.getsignal(signal.SIGTERM), before, "the handler from before was not put back")

    def test_noSignalNoStop(self) -> None:
        import signal

        before = signal.getsignal(signal.SIGINT)
        service, reactor = self.service()
        service._holdStopSignalsUntilRunning()
        self.addCleanup(signal.signal, signal.SIGINT, before)
        [(running, args, kwargs)] = reactor.whenRunningHooks
        running(*args, **kwargs)
        self.assertFalse(reactor.hasStopped)
        self.assertIs(signal.getsignal(signal.SIGINT), before)
