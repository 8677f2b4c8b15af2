"""
Routes: one upstream of a model-routed pool, as ``--config``'s
``[[upstreams]]`` describe it, and what the backend makes of it (its pool
member, its dialect, its headers).

A route is everything that differs from one upstream to the next when the
upstreams serve different models, perhaps from different providers: the API
it speaks, the model name it knows, its API key (sent to it and to no other),
its share of the load and its limit.  What all of them share (timeouts,
health path, back-off) stays in ``UpstreamSettings``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from cc50tw.backends.http.dialects import CompletionDialect, Dialect, OpenAICompletionsDialect
from cc50tw.backends.pool import Upstream

#: ``dialect =`` values, and the API each names.
DIALECTS = {
    "llama": "/completion",
    "openai": "/v1/completions",
    "chat": "/v1/chat/completions",
}


@attrs.frozen
class UpstreamRoute:
    """One ``[[upstreams]]`` entry, checked (``cc50tw.config`` does the checking)."""

    url: str
    #: One of ``DIALECTS``.
    dialect: str
    #: The name clients ask for; several routes may serve one.
    model: str
    #: The name sent upstream; ``None``: ``model``.
    upstream_model: str | None = None
    #: Sent to this upstream only, as ``Authorization: Bearer``.
    api_key: str | None = attrs.field(default=None, repr=False)
    weight: float = 1.0
    #: Requests this upstream takes at once; ``None``: no limit.
    max_concurrency: int | None = None

    @property
    def sentModel(self) -> str:
        return self.upstream_model if self.upstream_model is not None else self.model

    def member(self) -> Upstream:
        """Its member of the pool, which routing reads the model, weight and limit off."""
        return Upstream(self.url, model=self.model, weight=self.weight, maxConcurrency=self.max_concurrency)

    def makeDialect(self, where: str, llamaExtensions: bool) -> Dialect:
        """
        Its own dialect, which always sends ``sentModel``: the request's
        ``model`` is the name clients use, and routing has already acted on it.
        """
        if self.dialect == "llama":
            return CompletionDialect(where)
        return OpenAICompletionsDialect(
            where, chat=self.dialect == "chat", llamaExtensions=llamaExtensions, model=self.sentModel, routed=True
        )

    def headers(self, base: Mapping[bytes, Sequence[bytes]]) -> dict[bytes, list[bytes]]:
        """``base`` with this upstream's key (its own, never another upstream's)."""
        headers = {name: list(values) for name, values in base.items() if name.lower() != b"authorization"}
        if self.api_key is not None:
            headers[b"Authorization"] = [b"Bearer " + self.api_key.encode("ascii")]
        return headers


__all__ = ["DIALECTS", "UpstreamRoute"]
