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
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import cc50tw.plugins
from cc50tw.backends import discoverBackends
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
        self.assertEqual(discovery.problems, [])

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
