"""
``cc50 infer``'s generation options through a real ``twistd cc50
--backend=llama_server`` in front of a real llama-server (the small
generated model, one slot).

The reference is the same request made with raw frames
(``tests.helpers.RawConnection`` and ``cc50tw.codec.encode_infer``), so what
is checked is the command line and the client library: that each flag
reaches the wire as the option it names, and that the finish reason comes
back.  Whether llama-server honours the options is
``tests/test_generation_options_real.py``'s business.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from cc50tw.codec import encode_infer
from cc50tw.generation import GenerationOptions
from tests.conftest import CC50Launcher
from tests.helpers import ServerProcess, cc50_command
from tests.llama_fixtures import running_llama
from tests.llama_support import LlamaServer

MAX_TOKENS = 24
PROMPT = "Once upon a time"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    yield from running_llama(tmp_path_factory, "llama-client-options", parallel=1, context=2048)


@pytest.fixture(scope="module")
def bridge(llama: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    launcher = CC50Launcher(tmp_path_factory.mktemp("cc50-client-options"))
    yield launcher.start("--backend=llama_server", f"--llama-url={llama.url}")
    launcher.stop_all()  # a clean exit and no traceback in the log


def cc50(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cc50_command(*args), capture_output=True, text=True, timeout=TIMEOUT + 30, stdin=subprocess.DEVNULL
    )


def raw(server: ServerProcess, options: GenerationOptions) -> tuple[str, str | None]:
    """The text and finish reason of ``PROMPT`` with ``options``, asked with hand-made frames."""
    with server.connect(timeout=TIMEOUT) as connection:
        connection.send(encode_infer(1, PROMPT, MAX_TOKENS, 0, options=options))
        outcome = connection.collect([1], timeout=TIMEOUT)[1]
    assert outcome.error is None, outcome.error
    assert outcome.done is not None
    return outcome.text.decode("utf-8"), outcome.done.finish_reason


def test_infer_options_are_the_raw_requests(bridge: ServerProcess) -> None:
    greedy, reason = raw(bridge, GenerationOptions(temperature=0, seed=1))
    assert reason == "length", greedy
    # A stop string from the middle of the greedy answer, so stopping shows.
    stop = next(
        greedy[i : i + 3] for i in range(len(greedy) // 2, len(greedy) - 3) if greedy[i : i + 3].strip()
    )
    expected, reason = raw(bridge, GenerationOptions(temperature=0, seed=1, stop=(stop,)))
    assert reason == "stop" and expected == greedy[: greedy.index(stop)], (stop, expected, greedy)

    args = ("--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--seed", "1")
    result = cc50("infer", "--server", bridge.address, *args, "--stop", stop)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert result.stderr.rstrip("\n").endswith(" finish_reason=stop"), result.stderr

    result = cc50("infer", "--server", bridge.address, *args)
    assert (result.returncode, result.stdout) == (0, greedy + "\n"), result.stderr
    assert result.stderr.rstrip("\n").endswith(" finish_reason=length"), result.stderr


def test_models_lists_what_the_bridge_honours(bridge: ServerProcess) -> None:
    result = cc50("models", "--server", bridge.address, "--json")
    assert result.returncode == 0, result.stderr
    capabilities = json.loads(result.stdout)
    assert {"temperature", "seed", "stop"} <= set(capabilities["options"]), capabilities
    verbose = cc50("models", "--server", bridge.address, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert "# options: " in verbose.stdout and "temperature" in verbose.stdout
