"""
The openai backend against llama-server's OpenAI-compatible API, end to end.

A real ``llama-server`` started with ``--api-key`` (so requests without the
right ``Authorization: Bearer`` are refused, as OpenAI and vLLM with a key
refuse them), and ``twistd cc50 --backend=openai --openai-url=...
--model=... --api-key-file=...`` in front of it.  With greedy sampling, the
text streamed through the bridge must equal what the same request made
directly returns, for ``/v1/completions`` and, with ``--openai-chat``,
``/v1/chat/completions``.

These tests skip, saying why, only when llama-server is not installed and
``CI`` is not ``true``; in CI a missing llama-server fails them.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from cc50tw.client import connect
from cc50tw.codec import ErrorCode
from cc50tw.errors import ClientError
from tests.conftest import StartCC50
from tests.helpers import ServerProcess, cc50_command
from tests.llama_fixtures import running_llama
from tests.llama_support import LlamaServer, stream_events

reactor: Any = _reactor

API_KEY = "sk-cc50-test-key"
MODEL = "cc50-test-model"


@pytest.fixture(scope="module")
def keyed_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama-server with the small model that wants ``Authorization: Bearer API_KEY``."""
    yield from running_llama(tmp_path_factory, "keyed-llama", extra_args=("--api-key", API_KEY))


def key_file(tmp_path: Path, key: str = API_KEY) -> Path:
    path = tmp_path / "api-key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def bridge(cc50_server: StartCC50, llama: LlamaServer, tmp_path: Path, *args: str, key: str = API_KEY) -> ServerProcess:
    return cc50_server(
        "--backend=openai",
        f"--openai-url={llama.url}",
        f"--model={MODEL}",
        f"--api-key-file={key_file(tmp_path, key)}",
        *args,
    )


def direct(llama: LlamaServer, prompt: str, max_tokens: int, chat: bool = False) -> tuple[str, dict[str, int]]:
    """
    The request the bridge makes, made directly (twice, so that the prompt
    is cached the same way the bridge's request will find it): its text and usage.
    """
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    result: tuple[str, dict[str, int]] = ("", {})
    for _ in range(2):
        pieces: list[str] = []
        usage: dict[str, int] = {}
        for event in stream_events(llama.url + path, body, headers={"Authorization": f"Bearer {API_KEY}"}):
            if isinstance(event, str):
                continue
            for choice in event.get("choices", []):
                if chat:
                    pieces.append((choice.get("delta") or {}).get("content") or "")
                else:
                    pieces.append(choice.get("text") or "")
            if event.get("usage"):
                usage = event["usage"]
        result = "".join(pieces), usage
    return result


def test_v1_completions_with_key_and_model(keyed_llama: LlamaServer, cc50_server: StartCC50, tmp_path: Path) -> None:
    server = bridge(cc50_server, keyed_llama, tmp_path)
    prompt = "The quick brown fox jumps over the lazy dog"
    text, usage = direct(keyed_llama, prompt, 40)
    assert text and usage["completion_tokens"] == 40

    result = subprocess.run(
        cc50_command("infer", "--server", server.endpoint, "--prompt", prompt, "--max-tokens", "40"),
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode("utf-8") == text + "\n"
    stats = dict(re.findall(r"(\w+)=(\d+)", result.stderr.decode()))
    assert int(stats["tokens"]) == 40
    assert int(stats["prompt_tokens"]) == usage["prompt_tokens"] > 0
    log = server.log()
    assert f"OpenAI-compatible server at {keyed_llama.url} is healthy" in log
    assert API_KEY not in log  # the key is never logged


@pytest_twisted.ensureDeferred
async def test_chat_completions_with_the_prompt_as_one_user_message(
    keyed_llama: LlamaServer, cc50_server: StartCC50, tmp_path: Path
) -> None:
    server = bridge(cc50_server, keyed_llama, tmp_path, "--openai-chat")
    prompt = "Tell me about the weather"
    text, usage = direct(keyed_llama, prompt, 24, chat=True)
    assert usage["completion_tokens"] == 24

    client = await connect(reactor, server.endpoint)
    try:
        completion = await client.infer(prompt, max_tokens=24).collect()
    finally:
        await client.close()
    assert completion.text == text
    assert completion.stats.generated_tokens == 24
    # The chat template wraps the prompt, so the server counted more than the prompt's own tokens.
    assert completion.stats.prompt_tokens == usage["prompt_tokens"] > 0


@pytest_twisted.ensureDeferred
async def test_wrong_key_is_refused_by_the_upstream(
    keyed_llama: LlamaServer, cc50_server: StartCC50, tmp_path: Path
) -> None:
    server = bridge(cc50_server, keyed_llama, tmp_path, key="sk-wrong")
    client = await connect(reactor, server.endpoint)
    try:
        for _ in range(2):  # a 401 is the request's problem: the upstream is not taken out of routing
            with pytest.raises(ClientError) as caught:
                await client.infer("hello", max_tokens=4).collect()
            assert caught.value.code == ErrorCode.BACKEND_ERROR
            assert "HTTP 401" in caught.value.message and "Invalid API Key" in caught.value.message
    finally:
        await client.close()
    assert server.alive()
    assert "is down" not in server.log()
