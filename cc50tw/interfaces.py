"""
The contract between the CC50 server and whatever generates tokens.

A backend streams text into a sink that follows Twisted's consumer model: the
backend registers itself (or a per-request object) as an ``IPushProducer`` with
the sink, and the sink pauses it when the client's credit window is spent or
the socket's send buffer is full.  That is how flow control reaches from the
socket back to the model without the backend knowing about either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import Attribute, Interface

from cc50tw.generation import NO_OPTIONS, GenerationOptions


class InferenceRequest(NamedTuple):
    """What a backend needs to know about one request, decoded and defaulted."""

    req_id: int
    prompt: str
    max_tokens: int
    #: What the client asked for beyond prompt and length (all unset by default).
    options: GenerationOptions = NO_OPTIONS


class GenerationResult(NamedTuple):
    """
    What the backend reports when a stream ends normally.

    Counts come from the backend because only it knows them (an upstream
    model counts tokens, not the chunks it happened to send).
    """

    prompt_tokens: int
    generated_tokens: int
    #: Why generation stopped, where the backend knows ("stop", "length",
    #: a stop string...); logged with the request.
    finish_reason: str | None = None


class ITokenSink(Interface):
    """Where a backend writes a request's text."""

    def write(text: str) -> None:  # type: ignore[misc]
        """
        Deliver generated text, whole characters only.

        May call the registered producer's ``pauseProducing`` before it
        returns; the backend should stop producing soon after, though a few
        writes already under way are accepted and buffered.
        """

    def writeSequence(texts: Sequence[str]) -> None:  # type: ignore[misc]
        """
        Deliver several texts at once, each becoming its own chunk frame, in
        one write to the socket: how a backend that produces many tokens per
        reactor turn keeps the per-token cost down.
        """

    def registerProducer(producer: IPushProducer, streaming: bool) -> None:  # type: ignore[misc]
        """Give the sink the handle it pauses and resumes; ``streaming`` must be True."""

    def unregisterProducer() -> None:  # type: ignore[misc]
        """The backend has finished producing."""


class IBackend(Interface):
    """
    A source of token streams: the toy kernel, llama-server, or a plugin's.

    Optional attributes, read with ``getattr``: ``generationOptions``, the
    names of the generation options (``cc50tw.generation.OPTION_NAMES``) the
    backend honours (a request that sets any other is refused with
    BAD_REQUEST naming it, before ``generate``; without the attribute, none);
    and ``models()``, the model names it serves, which HELLO advertises.
    """

    name = Attribute("Short name for logs and metrics, e.g. 'toy'.")

    def describe() -> str:  # type: ignore[misc]
        """One line for the startup log: what this backend is and where it runs."""

    def generate(request: InferenceRequest, sink: ITokenSink) -> Deferred[GenerationResult]:  # type: ignore[misc]
        """
        Stream the answer to ``request`` into ``sink``.

        The returned Deferred fires with a ``GenerationResult`` when the answer
        is complete, or fails with ``BackendError`` (or any exception, which the
        server reports as a backend error).  Cancelling the Deferred must stop
        the backend's work promptly; the server cancels it when the client
        cancels or goes away.
        """

    def checkHealth() -> Deferred[bool]:  # type: ignore[misc]
        """
        Whether the backend can serve now (the upstream answers, the GPU is
        there); polled by the server for ``/readyz`` and ``cc50_backend_up``.
        """

    def startBackend() -> Deferred[None] | None:  # type: ignore[misc]
        """Prepare (compile kernels, check the upstream); called once at service start."""

    def stopBackend() -> Deferred[None] | None:  # type: ignore[misc]
        """Release what ``startBackend`` took; called once at service stop."""


class ImmediateAnswer(NamedTuple):
    """A whole answer, ready at once: one chunk frame per text, then RESP_DONE with ``result``."""

    texts: Sequence[str]
    result: GenerationResult


class IImmediateBackend(Interface):
    """
    Optional, for a backend that can sometimes answer without streaming: a
    cache hit, an echo, the toy at zero iterations.

    A streamed answer costs a stream, a producer registration and a Deferred
    per request; for an answer that is ready at once that machinery is most
    of the server's work (issue 18).  Before it calls ``generate`` the server
    asks ``answerNow``; a whole answer is then sent in one write and recorded
    like any other request (metrics, the request log), and ``generate`` is
    never called for that request.
    """

    def answerNow(request: InferenceRequest, budget: int) -> ImmediateAnswer | None:  # type: ignore[misc]
        """
        The whole answer to ``request`` now, or None to stream it through
        ``generate`` instead.

        Called on the reactor, so answer only what is ready or costs next to
        nothing to compute; and only if the answer's text, UTF-8 encoded, is
        at most ``budget`` bytes (the client's credit window).  An answer over
        the budget is still delivered in full, held back until the client
        grants credit for it; an exception is the request's BACKEND_ERROR.
        The server asks only while a backend slot is free and nothing is
        queued for one (``--max-concurrency``).
        """


class IBackendFactory(Interface):
    """
    A backend as a plugin: what ``twistd cc50 --backend=NAME`` looks up.

    Providers also provide ``twisted.plugin.IPlugin`` and live in a module of
    the ``cc50tw.plugins`` package (see ``docs/backends.md``).  A provider
    may also have ``flags``, on/off options in ``usage.Options.optFlags``
    form (``[long, short, doc]``); ``BackendSpec`` has it, empty by default.
    """

    name = Attribute("The --backend value, e.g. 'toy'.")
    description = Attribute("One line for twistd cc50 --help.")
    options = Attribute(
        "Backend options in usage.Options.optParameters form: "
        "[long, short, default, doc, coerce]; they become twistd cc50 options."
    )

    def build(options: Mapping[str, Any], reactor: Any) -> IBackend:  # type: ignore[misc]
        """Make the backend from the parsed options; raise ValueError with a clear message if they are wrong."""


class IBackendMetrics(Interface):
    """
    Optional, for a backend that exports Prometheus metrics of its own (the
    upstream pool's per-upstream gauges and counters, for example).

    When the server's factory is created it registers every collector
    returned here in its private registry, so they appear on ``/metrics``
    next to the server's own.  Collectors are read at scrape time, in the
    reactor thread; name their metrics ``cc50_<something>_...`` and keep
    clear of the server's names (a collector that collides is skipped with
    a log line).
    """

    def collectors() -> Iterable[Any]:  # type: ignore[misc]
        """``prometheus_client`` collectors (objects with ``collect()``) to register."""
