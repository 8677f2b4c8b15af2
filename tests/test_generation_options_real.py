"""
Generation options (``cc50tw.generation``) against a real llama-server.

A real ``llama-server`` (one slot, one thread, the small generated model)
sits behind a real ``twistd cc50 --backend=llama_server``; the tests send
REQ_INFER frames carrying an options block over a raw socket
(``tests.helpers.RawConnection``; the client library takes no options) and
compare what comes back with what llama-server answers when asked the same
thing directly over HTTP.

The direct requests are built here, from llama.cpp's and OpenAI's field
names, not by cc50tw's dialects: a wrong field name in the mapping shows up
as a difference (or as a sampling field that changes nothing), not as the
same mistake made twice.

What is checked:

- greedy sampling (temperature 0, top_k 1), with and without the penalty
  fields, gives llama-server's own text on ``/completion``,
  ``/v1/completions`` and ``/v1/chat/completions``, for several prompts;
- top_k, top_p and min_p narrow a hot sample to the greedy answer;
- a seed at temperature 1.5 gives llama-server's text for that seed, and
  different seeds give different texts (the seed is really sent);
- a stop string ends the text where llama-server ends it, with finish
  reason "stop"; running into max_tokens says "length";
- ``system`` is refused (BAD_REQUEST naming it) where the API takes one
  prompt, and reaches a chat upstream as a system message;
- ``extra`` fields reach llama-server as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cc50tw.codec import ErrorCode, encode_infer
from cc50tw.generation import GenerationOptions
from tests.conftest import CC50Launcher
from tests.helpers import RawConnection, ServerProcess
from tests.llama_fixtures import running_llama
from tests.llama_support import LlamaServer, stream_events

ENDPOINTS = ("/completion", "/v1/completions", "/v1/chat/completions")

#: Prompts whose answers differ from one another (checked below; under the chat template, less so).
PROMPTS = ("Once upon a time", "The quick brown fox", "Counting tokens")

MAX_TOKENS = 32

#: Greedy: the most likely token every time, so the text is a function of
#: the prompt (and the penalties) alone.
GREEDY: dict[str, Any] = {"temperature": 0.0, "top_k": 1}

#: Greedy plus every other sampling field.  The penalties change a greedy
#: answer (the small model repeats itself), so a penalty that is not sent,
#: or sent under a name llama-server does not read, gives a different text;
#: top_p and min_p cannot change a greedy choice, but llama-server must
#: still accept them.
PENALISED: dict[str, Any] = {
    **GREEDY,
    "top_p": 0.9,
    "min_p": 0.05,
    "repeat_penalty": 1.5,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
}

#: llama.cpp's stop_type in the words RESP_DONE uses (OpenAI's).
LLAMA_STOP_TYPES = {"limit": "length", "word": "stop", "eos": "stop"}

RESPONSE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    generated_tokens: int | None


# Fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """
    llama-server with the small model, one slot and one thread (the
    fixture's default): every request, direct or through the bridge, runs in
    the same slot, and the one before it has left the prompt cached.
    """
    yield from running_llama(tmp_path_factory, "llama-options", parallel=1, context=2048)


@pytest.fixture(scope="module")
def bridge(llama: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ServerProcess]]:
    """``bridge(endpoint)``: a ``twistd cc50`` in front of ``llama`` speaking that endpoint, one per endpoint."""
    launcher = CC50Launcher(tmp_path_factory.mktemp("cc50-options"))
    started: dict[str, ServerProcess] = {}

    def get(endpoint: str) -> ServerProcess:
        if endpoint not in started:
            started[endpoint] = launcher.start(
                "--backend=llama_server", f"--llama-url={llama.url}", f"--llama-endpoint={endpoint}"
            )
        return started[endpoint]

    yield get
    launcher.stop_all()  # SIGTERM, a clean exit and no traceback in any log


# Helpers --------------------------------------------------------------------------


def options_for(fields: dict[str, Any], **more: Any) -> GenerationOptions:
    return GenerationOptions(**fields, **more)


def through_bridge(
    server: ServerProcess,
    prompt: str,
    max_tokens: int,
    options: GenerationOptions,
    conn: RawConnection | None = None,
    req_id: int = 1,
) -> Answer:
    """One request with ``options`` through the bridge; fails the test on RESP_ERR."""
    own = conn is None
    connection = server.connect(timeout=RESPONSE_TIMEOUT) if conn is None else conn
    try:
        connection.send(encode_infer(req_id, prompt, max_tokens, 0, options=options))
        outcome = connection.collect([req_id], timeout=RESPONSE_TIMEOUT)[req_id]
    finally:
        if own:
            connection.close()
    assert outcome.error is None, (
        f"RESP_ERR {ErrorCode(outcome.error.code).name}: {outcome.error.message}\n{server.log_tail()}"
    )
    assert outcome.done is not None
    return Answer(outcome.text.decode("utf-8"), outcome.done.finish_reason, outcome.done.generated_tokens)


def direct_body(
    endpoint: str, prompt: str, max_tokens: int, fields: dict[str, Any], system: str | None = None
) -> dict[str, Any]:
    """The request llama-server should get, in its own API's names (written here, not by cc50tw)."""
    body: dict[str, Any] = {"stream": True, "cache_prompt": True}
    if endpoint != "/completion":
        body["stream_options"] = {"include_usage": True}  # the counts
    if endpoint == "/completion":
        assert system is None
        body.update(prompt=prompt, n_predict=max_tokens)
    elif endpoint == "/v1/completions":
        assert system is None
        body.update(prompt=prompt, max_tokens=max_tokens)
    else:
        messages = [{"role": "system", "content": system}] if system is not None else []
        body.update(messages=[*messages, {"role": "user", "content": prompt}], max_tokens=max_tokens)
    body.update(fields)
    return body


def ask_directly(body: dict[str, Any], url: str, endpoint: str) -> Answer:
    pieces: list[str] = []
    reason: str | None = None
    generated: int | None = None
    for event in stream_events(url + endpoint, body, timeout=RESPONSE_TIMEOUT):
        if isinstance(event, str):
            continue
        assert "error" not in event, f"llama-server refused {body}: {event}"
        if endpoint == "/completion":
            pieces.append(event.get("content") or "")
            if event.get("stop"):
                reason = LLAMA_STOP_TYPES.get(event.get("stop_type", ""), event.get("stop_type"))
                generated = event.get("tokens_predicted")
            continue
        for choice in event.get("choices", []):
            if endpoint == "/v1/completions":
                pieces.append(choice.get("text") or "")
            else:
                pieces.append((choice.get("delta") or {}).get("content") or "")
            reason = choice.get("finish_reason") or reason
        usage = event.get("usage")
        if usage:
            generated = usage.get("completion_tokens")
    return Answer("".join(pieces), reason, generated)


def reference(
    llama: LlamaServer,
    endpoint: str,
    prompt: str,
    max_tokens: int,
    fields: dict[str, Any],
    system: str | None = None,
) -> Answer:
    """
    llama-server's own answer, asked twice so that the one kept found its
    prompt cached, as the bridge's request (which sends ``cache_prompt``
    and follows this one into the same slot) will.
    """
    body = direct_body(endpoint, prompt, max_tokens, fields, system)
    ask_directly(body, llama.url, endpoint)
    return ask_directly(body, llama.url, endpoint)


# 1. Greedy ------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_greedy_text_is_llama_servers(
    llama: LlamaServer, bridge: Callable[[str], ServerProcess], endpoint: str
) -> None:
    server = bridge(endpoint)
    plain: dict[str, Answer] = {}
    penalised: dict[str, Answer] = {}
    with server.connect(timeout=RESPONSE_TIMEOUT) as conn:
        for number, prompt in enumerate(PROMPTS):
            for fields, answers, req_id in ((GREEDY, plain, 2 * number + 1), (PENALISED, penalised, 2 * number + 2)):
                expected = reference(llama, endpoint, prompt, MAX_TOKENS, fields)
                assert expected.text and expected.generated_tokens == MAX_TOKENS, expected
                got = through_bridge(server, prompt, MAX_TOKENS, options_for(fields), conn, req_id)
                assert got.text == expected.text, f"{endpoint} {prompt!r} {fields}"
                assert got.finish_reason == expected.finish_reason == "length"
                assert got.generated_tokens == MAX_TOKENS
                answers[prompt] = got
    # The prompts must matter, or three prompts test no more than one.  Under
    # the chat template the small model's answer hardly depends on the user's
    # words (the template's last tokens decide it): the greedy answer is the
    # same for every prompt, and the penalised one (the penalties count the
    # prompt's tokens) is one of two, so chat can show only two different.
    answers_by_prompt = {prompt: (plain[prompt].text, penalised[prompt].text) for prompt in PROMPTS}
    distinct = 2 if endpoint == "/v1/chat/completions" else len(PROMPTS)
    assert len(set(answers_by_prompt.values())) >= distinct, (
        f"the prompts should get {distinct} different answers (plain, penalised); got {answers_by_prompt}"
    )
    changed = [prompt for prompt in PROMPTS if penalised[prompt].text != plain[prompt].text]
    assert changed, (
        "repeat/presence/frequency penalties changed no greedy answer, so this test cannot tell whether "
        f"cc50tw sends them: {penalised}"
    )


# 2. Seeds -------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["/completion", "/v1/completions"])
def test_seed_gives_llama_servers_text_for_that_seed(
    llama: LlamaServer, bridge: Callable[[str], ServerProcess], endpoint: str
) -> None:
    server = bridge(endpoint)
    seeds = (1, 2)
    texts: dict[tuple[str, int], str] = {}
    with server.connect(timeout=RESPONSE_TIMEOUT) as conn:
        req_id = 0
        for prompt in PROMPTS:
            for seed in seeds:
                fields = {"temperature": 1.5, "seed": seed}
                expected = reference(llama, endpoint, prompt, 24, fields)
                req_id += 1
                got = through_bridge(server, prompt, 24, options_for(fields), conn, req_id)
                assert got.text == expected.text, f"{endpoint} {prompt!r} seed {seed}"
                req_id += 1
                again = through_bridge(server, prompt, 24, options_for(fields), conn, req_id)
                assert again.text == got.text, f"the same seed gave two texts for {prompt!r}"
                texts[prompt, seed] = got.text
    differing = [prompt for prompt in PROMPTS if texts[prompt, seeds[0]] != texts[prompt, seeds[1]]]
    assert differing, (
        f"seeds {seeds} gave the same text for every prompt, so the seed may not be reaching llama-server "
        f"(or the model cannot tell; choose other prompts): {texts}"
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_truncation_fields_reach_llama_server(
    llama: LlamaServer, bridge: Callable[[str], ServerProcess], endpoint: str
) -> None:
    """
    top_k, top_p and min_p cannot change a greedy answer, so here they
    narrow a hot seeded sample instead: each alone leaves only the likeliest
    token (top_k 1; top_p 0.01, as the likeliest token has more than 1%;
    min_p 1, nothing but the likeliest), so the answer becomes the greedy
    one, which the same seed without them does not give.
    """
    server = bridge(endpoint)
    prompt = PROMPTS[0]
    hot: dict[str, Any] = {"temperature": 1.5, "seed": 3}
    greedy = reference(llama, endpoint, prompt, MAX_TOKENS, GREEDY)
    sampled = reference(llama, endpoint, prompt, MAX_TOKENS, hot)
    assert sampled.text != greedy.text, "the seeded sample is the greedy answer: this test would prove nothing"
    with server.connect(timeout=RESPONSE_TIMEOUT) as conn:
        narrowing: list[dict[str, Any]] = [{"top_k": 1}, {"top_p": 0.01}, {"min_p": 1.0}]
        for req_id, narrow in enumerate(narrowing, start=1):
            expected = reference(llama, endpoint, prompt, MAX_TOKENS, {**hot, **narrow})
            assert expected.text == greedy.text, f"llama-server itself: {narrow} did not make the answer greedy"
            got = through_bridge(server, prompt, MAX_TOKENS, options_for({**hot, **narrow}), conn, req_id)
            assert got.text == greedy.text, f"{narrow} did not reach llama-server through {endpoint}"


# 3. Stop strings and finish reasons ---------------------------------------------


def stop_string_within(text: str) -> str:
    """A few characters from the middle of ``text``, at their first occurrence there."""
    middle = len(text) // 2
    for start in range(middle, len(text) - 3):
        candidate = text[start : start + 3]
        if candidate.strip() and text.index(candidate) > 0:
            return candidate
    raise AssertionError(f"no stop string to pick from {text!r}")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_stop_string_ends_where_llama_server_ends(
    llama: LlamaServer, bridge: Callable[[str], ServerProcess], endpoint: str
) -> None:
    server = bridge(endpoint)
    prompt = PROMPTS[0]
    greedy = reference(llama, endpoint, prompt, MAX_TOKENS, GREEDY)
    assert greedy.finish_reason == "length"
    stop = stop_string_within(greedy.text)
    cut = greedy.text[: greedy.text.index(stop)]

    expected = reference(llama, endpoint, prompt, MAX_TOKENS, {**GREEDY, "stop": [stop]})
    assert expected.text == cut and expected.finish_reason == "stop", (
        f"llama-server itself did not stop at {stop!r}: {expected}"
    )
    with server.connect(timeout=RESPONSE_TIMEOUT) as conn:
        got = through_bridge(server, prompt, MAX_TOKENS, options_for(GREEDY, stop=[stop]), conn, 1)
        assert got.text == expected.text == cut, f"stop {stop!r}"
        assert got.finish_reason == "stop"
        assert got.generated_tokens is not None and got.generated_tokens < MAX_TOKENS

        # A stop string the answer never contains: it runs to max_tokens.
        unused = "\u2603never"
        assert unused not in greedy.text
        got = through_bridge(server, prompt, MAX_TOKENS, options_for(GREEDY, stop=[unused]), conn, 2)
        assert got.text == greedy.text
        assert (got.finish_reason, got.generated_tokens) == ("length", MAX_TOKENS)

        # Two stop strings: the first to occur ends the answer.
        early = stop_string_within(cut) if len(cut) >= 8 else stop
        got = through_bridge(server, prompt, MAX_TOKENS, options_for(GREEDY, stop=[stop, early]), conn, 3)
        assert got.text == greedy.text[: greedy.text.index(early)]
        assert got.finish_reason == "stop"


# 4. system and extra --------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["/completion", "/v1/completions"])
def test_system_refused_without_chat(llama: LlamaServer, bridge: Callable[[str], ServerProcess], endpoint: str) -> None:
    server = bridge(endpoint)
    with server.connect(timeout=RESPONSE_TIMEOUT) as conn:
        conn.send(encode_infer(7, PROMPTS[0], 8, 0, options=GenerationOptions(system="You are terse.", **GREEDY)))
        outcome = conn.collect([7], timeout=RESPONSE_TIMEOUT)[7]
        assert outcome.done is None and outcome.error is not None, outcome
        assert outcome.error.code == ErrorCode.BAD_REQUEST, outcome.error
        assert "'system'" in outcome.error.message, outcome.error.message
        assert not outcome.text
        # The connection carries on: the same request without the system prompt is answered.
        expected = reference(llama, endpoint, PROMPTS[0], 8, GREEDY)
        got = through_bridge(server, PROMPTS[0], 8, options_for(GREEDY), conn, 8)
        assert got.text == expected.text


def test_system_reaches_a_chat_upstream(llama: LlamaServer, bridge: Callable[[str], ServerProcess]) -> None:
    endpoint = "/v1/chat/completions"
    server = bridge(endpoint)
    system = "You answer in one word."
    for prompt in PROMPTS:
        expected = reference(llama, endpoint, prompt, MAX_TOKENS, GREEDY, system=system)
        got = through_bridge(server, prompt, MAX_TOKENS, options_for(GREEDY, system=system))
        assert got.text == expected.text, f"system prompt with {prompt!r}"
        assert got.finish_reason == "length"


def test_extra_fields_reach_llama_server(llama: LlamaServer, bridge: Callable[[str], ServerProcess]) -> None:
    """
    ``logit_bias`` bans the token that the greedy answer repeats, a change
    the text shows; ``ignore_eos`` and ``n_probs`` (which adds probabilities
    to every event) must not disturb the stream.  (``ignore_eos`` cannot show
    an effect: the generated model never picks its end-of-text token, whose
    output row is zero, so every answer runs to max_tokens anyway.)
    """
    endpoint = "/completion"
    server = bridge(endpoint)
    prompt = PROMPTS[0]
    greedy = reference(llama, endpoint, prompt, MAX_TOKENS, GREEDY)
    words = greedy.text.split()
    banned = " " + max(words, key=words.count)  # the word the model repeats
    extra: dict[str, Any] = {"logit_bias": [[banned, False]], "ignore_eos": True, "n_probs": 1}

    expected = reference(llama, endpoint, prompt, MAX_TOKENS, {**GREEDY, **extra})
    assert expected.text != greedy.text, f"banning {banned!r} should change {greedy.text!r}"
    got = through_bridge(server, prompt, MAX_TOKENS, options_for(GREEDY, extra=extra))
    assert got.text == expected.text, f"extra {extra}"
    assert got.text != greedy.text, "the logit_bias in 'extra' did not reach llama-server"
    assert (got.finish_reason, got.generated_tokens) == ("length", MAX_TOKENS)
