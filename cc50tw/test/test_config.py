"""
``twistd cc50 --config=FILE``: options from a TOML file, the command line
winning, and ``[[upstreams]]`` checked with errors that name the key and the
upstream's index (``cc50tw.config``).
"""

from __future__ import annotations

import os
import tempfile
import textwrap

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from cc50tw.backends.http.routes import UpstreamRoute
from cc50tw.backends.llama_server import LlamaServerBackend
from cc50tw.backends.openai import OpenAIBackend
from cc50tw.config import ConfigError
from cc50tw.tap import Options

TWO_MODELS = """
backend = "openai"
[[upstreams]]
url = "http://127.0.0.1:8001"
dialect = "openai"
model = "alpha"
[[upstreams]]
url = "http://127.0.0.1:8002"
dialect = "openai"
model = "beta"
"""


class ConfigCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()

    def write(self, text: str, name: str = "cc50.toml") -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def parse(self, text: str, *argv: str) -> Options:
        options = Options()
        options.parseOptions([f"--config={self.write(text)}", *argv])
        return options

    def refused(self, text: str, *argv: str) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(text, *argv)
        return str(caught.exception)


class OptionKeysTests(ConfigCase):
    def test_optionsByLongName(self) -> None:
        options = self.parse(
            """
            backend = "llama_server"
            max-concurrency = 64
            llama-idle-timeout = 30
            llama_health_interval = 0
            quiet-requests = true
            listen = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"]
            """
        )
        self.assertEqual(options["backend"], "llama_server")
        self.assertEqual(options["max-concurrency"], 64)
        self.assertEqual(options["llama-idle-timeout"], 30.0)
        self.assertEqual(options["llama-health-interval"], 0.0)
        self.assertTrue(options["quiet-requests"])
        self.assertEqual(len(options["listen"]), 2)
        assert isinstance(options.backend, LlamaServerBackend)
        self.assertEqual(options.backend.idle_timeout, 30.0)

    def test_commandLineWins(self) -> None:
        options = self.parse(
            'backend = "llama_server"\nmax-concurrency = 64\nllama-url = ["http://a.test:1", "http://b.test:2"]\n',
            "--max-concurrency=8",
            "--llama-url=http://c.test:3",
        )
        self.assertEqual(options["max-concurrency"], 8)
        self.assertEqual(options["llama-url"], ["http://c.test:3"])

    def test_abbreviatedCommandLineOptionStillWins(self) -> None:
        """getopt accepts a unique prefix; the file's value is still the one replaced."""
        options = self.parse("max-concurrency = 64\n", "--max-conc", "9")
        self.assertEqual(options["max-concurrency"], 9)

    def test_nestedTableForAJSONOption(self) -> None:
        options = self.parse('backend = "llama_server"\n[llama-extra-body]\nmirostat = 2\n')
        self.assertEqual(options["llama-extra-body"], {"mirostat": 2})

    def test_falseFlagLeavesItOff(self) -> None:
        self.assertFalse(self.parse("quiet-requests = false\n")["quiet-requests"])

    def test_unknownKeyIsNamed(self) -> None:
        message = self.refused("max-concurency = 64\n")
        self.assertIn("unknown key 'max-concurency'", message)

    def test_configCannotNameAnother(self) -> None:
        self.assertIn("unknown key 'config'", self.refused('config = "other.toml"\n'))

    def test_badValueNamesTheKey(self) -> None:
        message = self.refused("max-concurrency = 0\n")
        self.assertIn("max-concurrency", message)
        self.assertIn("at least 1", message)
        self.assertIn("cc50.toml", message)

    def test_flagMustBeABoolean(self) -> None:
        self.assertIn("true or false", self.refused('quiet-requests = "yes"\n'))

    def test_listOnlyForRepeatableOptions(self) -> None:
        self.assertIn("not a list", self.refused("max-concurrency = [1, 2]\n"))

    def test_keySetTwice(self) -> None:
        self.assertIn("set twice", self.refused("max-concurrency = 1\nmax_concurrency = 2\n"))

    def test_missingFile(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions([f"--config={self.directory}/nope.toml"])
        self.assertIn("cannot read --config", str(caught.exception))

    def test_invalidTOML(self) -> None:
        self.assertIn("not valid TOML", self.refused("backend = \n"))

    def test_noConfigNoChange(self) -> None:
        options = Options()
        options.parseOptions(["--max-concurrency=3"])
        self.assertEqual(options["max-concurrency"], 3)
        self.assertIsNone(options.get("upstreams"))


class UpstreamsTests(ConfigCase):
    def test_theIssuesExample(self) -> None:
        options = self.parse(TWO_MODELS, "--openai-health-interval=0")
        backend = options.backend
        assert isinstance(backend, OpenAIBackend)
        self.assertEqual(backend.models(), ["alpha", "beta"])
        self.assertEqual(backend.defaultModel, "alpha")
        self.assertEqual([upstream.model for upstream in backend.pool], ["alpha", "beta"])
        self.assertIn("'beta' at http://127.0.0.1:8002", backend.describe())

    def test_everyKey(self) -> None:
        keyFile = self.write("  sk-alpha \n", "alpha.key")
        options = self.parse(
            f"""
            backend = "llama_server"
            default_model = "beta"
            [[upstreams]]
            url = "http://127.0.0.1:8001/"
            dialect = "chat"
            model = "alpha"
            upstream_model = "org/alpha-7b"
            api_key_file = "{os.path.basename(keyFile)}"
            weight = 2.5
            max_concurrency = 4
            [[upstreams]]
            url = "http://127.0.0.1:8002"
            dialect = "llama"
            model = "beta"
            """
        )
        routes = options["upstreams"]
        self.assertEqual(
            routes[0],
            UpstreamRoute("http://127.0.0.1:8001", "chat", "alpha", "org/alpha-7b", "sk-alpha", 2.5, 4),
        )
        self.assertEqual(routes[1], UpstreamRoute("http://127.0.0.1:8002", "llama", "beta"))
        self.assertEqual(options["default-model"], "beta")
        assert isinstance(options.backend, LlamaServerBackend)
        self.assertEqual(options.backend.models(), ["beta", "alpha"])
        self.assertNotIn("sk-alpha", repr(routes[0]))

    def upstream(self, **keys: object) -> str:
        fields = {"url": '"http://127.0.0.1:8001"', "dialect": '"openai"', "model": '"alpha"'}
        fields.update({name: str(value) for name, value in keys.items()})
        body = "".join(f"{name} = {value}\n" for name, value in fields.items() if value != "DROP")
        return (
            'backend = "openai"\n[[upstreams]]\nurl = "http://127.0.0.1:8009"\ndialect = "llama"\nmodel = "z"\n'
            f"[[upstreams]]\n{body}"
        )

    def test_errorsNameTheKeyAndIndex(self) -> None:
        cases = [
            ({"url": "DROP"}, "upstreams[1]: url is required"),
            ({"model": "DROP"}, "upstreams[1]: model is required"),
            ({"dialect": "DROP"}, "upstreams[1]: dialect is required"),
            ({"url": '"ftp://x"'}, "upstreams[1].url must be an http:// or https:// URL"),
            ({"dialect": '"completion"'}, "upstreams[1].dialect must be one of"),
            ({"model": '""'}, "upstreams[1].model must be a non-empty string"),
            ({"model": "3"}, "upstreams[1].model must be a non-empty string"),
            ({"weight": "0"}, "upstreams[1].weight must be a positive number"),
            ({"weight": "true"}, "upstreams[1].weight must be a positive number"),
            ({"max_concurrency": "0"}, "upstreams[1].max_concurrency must be a whole number of at least 1"),
            ({"max_concurrency": "1.5"}, "upstreams[1].max_concurrency must be"),
            ({"api_key_file": '"missing.key"'}, "upstreams[1].api_key_file: cannot read"),
            ({"url": '"http://127.0.0.1:8009/"'}, "upstreams[1].url 'http://127.0.0.1:8009' is upstreams[0]'s too"),
            ({"colour": '"red"'}, "upstreams[1]: unknown key 'colour'"),
        ]
        for keys, expected in cases:
            with self.subTest(keys=keys):
                self.assertIn(expected, self.refused(self.upstream(**keys)))

    def test_emptyKeyFile(self) -> None:
        self.write("\n", "empty.key")
        self.assertIn("is empty", self.refused(self.upstream(api_key_file='"empty.key"')))

    def test_multiLineKeyFile(self) -> None:
        self.write("a\nb\n", "two.key")
        self.assertIn("more than one line", self.refused(self.upstream(api_key_file='"two.key"')))

    def test_notAListOfTables(self) -> None:
        self.assertIn("non-empty list of tables", self.refused('backend = "openai"\nupstreams = "x"\n'))
        self.assertIn("upstreams[0] must be a table", self.refused('backend = "openai"\nupstreams = [1]\n'))

    def test_defaultModelMustBeServed(self) -> None:
        message = self.refused('default_model = "gamma"\n' + TWO_MODELS)
        self.assertIn("default_model 'gamma' is served by no upstream", message)
        self.assertIn("'alpha', 'beta'", message)

    def test_defaultModelNeedsUpstreams(self) -> None:
        self.assertIn("needs [[upstreams]]", self.refused('default_model = "alpha"\n'))

    def test_onlyForHTTPBackends(self) -> None:
        self.assertIn("need backend", self.refused(TWO_MODELS, "--backend=toy"))

    def test_urlOptionsConflict(self) -> None:
        for argv in (["--openai-url=http://x.test"], ["--model=m"], ["--openai-chat"]):
            with self.subTest(argv=argv):
                self.assertIn("cannot be combined with the [[upstreams]]", self.refused(TWO_MODELS, *argv))
        self.assertIn(
            "--llama-url cannot be combined",
            self.refused(
                'llama-url = "http://x.test"\n' + TWO_MODELS.replace('backend = "openai"', 'backend = "llama_server"')
            ),
        )

    def test_configErrorIsAUsageError(self) -> None:
        self.assertTrue(issubclass(ConfigError, usage.UsageError))
