"""
The upstream APIs' dialects: one event in, a ``Delta`` out.

Pure functions of the event (and of what the stream learned so far), no
I/O, like ``cc50tw.codec``: every shape an upstream may send, the error
shapes included, is testable one event at a time.

Three dialects: llama.cpp's native ``/completion`` and the OpenAI-compatible
``/v1/completions`` and ``/v1/chat/completions`` (vLLM, TGI, Ollama,
llama-server).  An upstream reports a failure mid-stream in one of several
shapes, and each becomes ``Delta.error``, never a finished answer:

- an SSE event named ``error`` (its data a JSON error, or text);
- ``data: {"error": {...}}`` (llama-server, OpenAI);
- ``data: {"object": "error", "message": ...}`` (some vLLM versions, which
  then send ``[DONE]`` as if all were well);
- the non-standard ``error: {json}`` line of older llama-server builds,
  which ``SSEParser`` turns into an event named ``error``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import attrs

from cc50tw.backends.http.faults import Fault, errorFault
from cc50tw.generation import GenerationOptions, OptionsError
from cc50tw.interfaces import InferenceRequest
from cc50tw.sse import SSEEvent

ENDPOINTS = ("/completion", "/v1/completions", "/v1/chat/completions")

#: llama.cpp's stop_type in OpenAI's words, so every backend reports the same reasons.
LLAMA_STOP_TYPES = {"eos": "stop", "word": "stop", "limit": "length"}

#: finish_reason values that mean the answer failed, not that it ended.
FAILED_FINISH_REASONS = ("error", "abort")


class Delta(NamedTuple):
    """
    What one event adds to the answer.

    A NamedTuple rather than a frozen attrs class: one is built per token,
    and a tuple is built in one C call where a frozen class sets its eight
    fields one ``object.__setattr__`` at a time.
    """

    text: str = ""
    #: A reasoning model's thinking (``reasoning_content``), apart from the answer.
    reasoning: str = ""
    #: The dialect's terminal event: the answer is complete.
    finished: bool = False
    #: Why generation stopped, as the upstream put it ("stop", "length", "limit", ...).
    finishReason: str | None = None
    promptTokens: int | None = None
    generatedTokens: int | None = None
    #: Tokens this event carried (llama.cpp lists them per event).
    tokens: int = 0
    #: The upstream reported a failure: the request must end with it.
    error: Fault | None = None


@attrs.define
class Progress:
    """What one stream has learned from its events so far."""

    #: The request's max_tokens: the answer is complete once that many were streamed.
    limit: int = 0
    streamedTokens: int = 0
    finished: bool = False
    finishReason: str | None = None
    events: int = 0
    promptTokens: int | None = None
    generatedTokens: int | None = None

    def apply(self, delta: Delta) -> None:
        self.events += 1
        self.streamedTokens += delta.tokens
        if delta.promptTokens is not None:
            self.promptTokens = delta.promptTokens
        if delta.generatedTokens is not None:
            self.generatedTokens = delta.generatedTokens
        if delta.finishReason is not None:
            self.finishReason = delta.finishReason
        if delta.finished:
            self.finished = True


class Dialect(Protocol):
    """How to ask one kind of upstream API for a stream, and how to read it."""

    @property
    def path(self) -> str:
        """Where the API lives under the upstream's base URL."""

    @property
    def description(self) -> str:
        """A few words for the startup log."""

    def requestBody(self, request: InferenceRequest) -> dict[str, Any]:
        """The JSON body that starts a streaming generation for ``request``."""

    def interpret(self, event: SSEEvent, progress: Progress) -> Delta:
        """What ``event`` adds; ``progress`` is read, never changed."""

    def endedCleanly(self, progress: Progress) -> bool:
        """Whether a body that ended without the terminal event still counts as complete."""


class _Malformed(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None  # JSON's ints are ints; not a bool


def _string(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Malformed(f"sent {what} that is not a string: {value!r:.200}")
    return value


def _load(event: SSEEvent) -> dict[str, Any]:
    try:
        value = json.loads(event.data)
    except (ValueError, RecursionError) as e:
        raise _Malformed(f"sent an event that is not JSON ({e}): {event.data[:200]!r}") from None
    if not isinstance(value, dict):
        raise _Malformed(f"sent an event that is not a JSON object: {event.data[:200]!r}")
    return value


def streamError(event: SSEEvent, value: dict[str, Any] | None, where: str) -> Fault | None:
    """The failure an event reports, in any of the shapes above; None for an ordinary event."""
    if event.event == "error":
        try:
            body: object = json.loads(event.data)
        except (ValueError, RecursionError):
            body = event.data
        return errorFault(body, f"{where} failed mid-stream")
    if value is not None and (value.get("error") is not None or value.get("object") == "error"):
        return errorFault(value, f"{where} failed mid-stream")
    return None


def _interpreted(where: str, event: SSEEvent, read: Callable[[dict[str, Any]], Delta]) -> Delta:
    """Run a dialect's reading of one event; whatever is malformed becomes the error."""
    try:
        # Once per token: one parse, one look for an error, then the dialect.
        value = None if event.event == "error" else _load(event)
        error = streamError(event, value, where)
        if error is not None:
            return Delta(error=error)
        assert value is not None
        return read(value)
    except _Malformed as e:
        return Delta(error=Fault.backendError(f"{where} {e.message}"))


@attrs.frozen
class CompletionDialect:
    """llama.cpp's native ``/completion``: ``content`` per event, counts on ``stop: true``."""

    upstream: str
    path: str = "/completion"
    description: str = "llama.cpp /completion"

    def requestBody(self, request: InferenceRequest) -> dict[str, Any]:
        options = request.options
        if options.system is not None:
            raise OptionsError(
                "option 'system' needs a chat upstream (--llama-endpoint=/v1/chat/completions); /completion takes one prompt"
            )
        body: dict[str, Any] = {"prompt": request.prompt, "n_predict": request.max_tokens, "stream": True, "cache_prompt": True}
        body.update(_sampling(options, LLAMA_NAMES))
        return _withExtra(body, options)

    def interpret(self, event: SSEEvent, progress: Progress) -> Delta:
        def read(value: dict[str, Any]) -> Delta:
            get = value.get
            text = get("content")
            if type(text) is not str:
                text = _string(text, "content")
            reasoning = get("reasoning_content")
            reasoning = "" if reasoning is None else _string(reasoning, "reasoning_content")
            prompt, generated = _count(get("tokens_evaluated")), _count(get("tokens_predicted"))
            if get("stop") is True:
                stopType = get("stop_type")
                reason = LLAMA_STOP_TYPES.get(stopType, stopType) if isinstance(stopType, str) else "stop"
                return Delta(text, reasoning, True, reason, prompt, generated)
            tokens = get("tokens")
            count = len(tokens) if type(tokens) is list else 0
            # Once the last token the request allows has been streamed,
            # llama-server's final event (stop: true, stop_type "limit")
            # follows with no text a few hundred microseconds later: RESP_DONE
            # need not wait for it.  Counted from the events' own token lists,
            # not ``tokens_predicted``, which some builds advance by a whole
            # speculative batch before that batch's events have been sent.
            atLimit = count > 0 and 0 < progress.limit <= progress.streamedTokens + count
            return Delta(text, reasoning, atLimit, "length" if atLimit else None, prompt, generated, count)

        return _interpreted(self.upstream, event, read)

    def endedCleanly(self, progress: Progress) -> bool:
        return False  # llama-server always sends a final event with stop: true


@attrs.frozen
class OpenAICompletionsDialect:
    """
    OpenAI-style ``/v1/completions`` (and, with ``chat``, ``/v1/chat/completions``).

    The stream ends with ``data: [DONE]``; counts come from ``usage``, asked
    for with ``stream_options.include_usage`` and carried either by the last
    chunk with choices (llama-server's ``/v1/completions``) or by a chunk
    with none (OpenAI, vLLM, llama-server's chat).  ``llamaExtensions`` adds
    llama-server's ``cache_prompt``, which strict upstreams might reject;
    ``model`` names the model, which most servers other than llama-server
    require; a request's own ``model`` replaces it, unless ``routed`` (a
    ``--config`` upstream: the request's model chose this upstream, whose
    own name for it is ``model``).
    """

    upstream: str
    chat: bool = False
    llamaExtensions: bool = True
    model: str | None = None
    routed: bool = False

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    @property
    def description(self) -> str:
        return f"OpenAI-compatible {self.path}"

    def requestBody(self, request: InferenceRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        options = request.options
        model = options.model if options.model is not None and not self.routed else self.model
        if model is not None:
            body["model"] = model
        if self.chat:
            system = [{"role": "system", "content": options.system}] if options.system is not None else []
            body["messages"] = [*system, {"role": "user", "content": request.prompt}]
        elif options.system is not None:
            raise OptionsError("option 'system' needs the chat API (--openai-chat); /v1/completions takes one prompt")
        else:
            body["prompt"] = request.prompt
        if self.llamaExtensions:
            body["cache_prompt"] = True
            body.update(_sampling(options, LLAMA_NAMES))
        else:
            for name in LLAMA_ONLY:
                if getattr(options, name) is not None:
                    raise OptionsError(
                        f"option {name!r} is not part of OpenAI's API; if your server takes it, send it in 'extra' "
                        "(vLLM: top_k, min_p, repetition_penalty)"
                    )
            body.update(_sampling(options, OPENAI_NAMES))
        return _withExtra(body, options)

    def interpret(self, event: SSEEvent, progress: Progress) -> Delta:
        if event.event != "error" and event.data.strip() == "[DONE]":
            return Delta(finished=True)
        return _interpreted(self.upstream, event, self._read)

    def _read(self, value: dict[str, Any]) -> Delta:
        usage = value.get("usage")
        prompt = generated = None
        if isinstance(usage, dict):
            prompt, generated = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        choices = value.get("choices")
        if choices is None:
            return Delta(promptTokens=prompt, generatedTokens=generated)
        if not isinstance(choices, list):
            raise _Malformed(f"sent 'choices' that is not a list: {choices!r:.200}")
        texts, thoughts = [], []
        reason = None
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # we ask for one choice; ignore any other
            if self.chat:
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    texts.append(_string(delta.get("content"), "delta.content"))
                    thoughts.append(_string(delta.get("reasoning_content"), "delta.reasoning_content"))
            else:
                texts.append(_string(choice.get("text"), "text"))
            if choice.get("finish_reason") is not None:
                reason = str(choice["finish_reason"])
        if reason in FAILED_FINISH_REASONS:
            # Gateways (OpenRouter: "error") and vLLM ("abort") end a failed
            # answer this way, then send [DONE] as if all were well.
            return Delta(error=Fault.backendError(f"{self.upstream} ended the answer with finish_reason {reason!r}"))
        return Delta("".join(texts), "".join(thoughts), False, reason, prompt, generated)

    def endedCleanly(self, progress: Progress) -> bool:
        # Some OpenAI-compatible servers end the body without [DONE]; a choice
        # that said why it finished is as good a terminal event.
        return progress.finishReason is not None


#: Sampling options, by their name in each API (the same as ours, as it happens).
OPENAI_NAMES = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
LLAMA_ONLY = ("top_k", "min_p", "repeat_penalty")
LLAMA_NAMES = OPENAI_NAMES + LLAMA_ONLY


def _sampling(options: GenerationOptions, names: tuple[str, ...]) -> dict[str, Any]:
    body = {name: getattr(options, name) for name in names if getattr(options, name) is not None}
    if options.stop:
        body["stop"] = list(options.stop)
    return body


#: Fields the server sets and a request's ``extra`` may not replace: the
#: routed model (and its key's budget), the prompt, streaming, the length cap.
RESERVED_FIELDS = frozenset({"model", "prompt", "messages", "stream", "stream_options", "n_predict", "max_tokens"})


def _withExtra(body: dict[str, Any], options: GenerationOptions) -> dict[str, Any]:
    """The request's ``extra`` fields go in as they are, except over the fields the server sets."""
    if options.extra:
        reserved = sorted(RESERVED_FIELDS.intersection(options.extra))
        if reserved:
            raise OptionsError(
                f"option 'extra' may not set {reserved[0]!r}: the server sets it (use the option or "
                "max_tokens for what it means)"
            )
        body.update(options.extra)
    return body


def dialectFor(endpoint: str, upstream: str, llamaExtensions: bool = True, model: str | None = None) -> Dialect:
    """The dialect spoken at ``endpoint``, one of ``ENDPOINTS``; ``upstream`` names the server in messages."""
    if endpoint == "/completion":
        return CompletionDialect(upstream)
    if endpoint == "/v1/completions":
        return OpenAICompletionsDialect(upstream, chat=False, llamaExtensions=llamaExtensions, model=model)
    if endpoint == "/v1/chat/completions":
        return OpenAICompletionsDialect(upstream, chat=True, llamaExtensions=llamaExtensions, model=model)
    raise ValueError(f"unknown endpoint {endpoint!r}; choose one of {', '.join(ENDPOINTS)}")
