"""
Backends, and how ``twistd cc50`` finds them.

Every backend, cc50tw's own included, is a ``BackendSpec`` published as a
Twisted plugin in the ``cc50tw.plugins`` package: its name, a line for
``--help``, its own options (``usage.Options.optParameters`` form, plus
optional ``optFlags``-form flags) and a function that builds the
``IBackend`` from the parsed options.  Nothing special-cases the built-in
ones, except that when a third-party plugin's name or option collides with
one of theirs, theirs is kept.

An option whose coerce function is wrapped in ``Repeatable`` may be given
several times; its value is then the list of every value given, in order
(or ``[default]`` when it is not given at all).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from cc50tw.interfaces import IBackend, IBackendFactory

BackendBuilder = Callable[[Mapping[str, Any], Any], IBackend]

log = Logger()


@attrs.frozen
class Repeatable:
    """
    Marks a backend option that may repeat, e.g. ``--llama-url=A --llama-url=B``.

    Use it as the option's coerce function: ``["llama-url", None, DEFAULT,
    "doc", Repeatable(parseURL)]``.  Each value is coerced on its own; the
    parsed option is the list of them, or ``[default]`` (``[]`` for a
    default of ``None``) when the option was not given.
    """

    coerce: Callable[[str], Any] = str
    coerceDoc: str = ""  # the option's own doc says it may repeat

    def __call__(self, value: str) -> Any:
        return self.coerce(value)


def repeatableOptions(options: list[list[Any]]) -> dict[str, Any]:
    """The repeatable options among ``options`` (optParameters form), with their defaults."""
    return {option[0]: option[2] for option in options if len(option) > 4 and isinstance(option[4], Repeatable)}


@implementer(IPlugin, IBackendFactory)
@attrs.frozen
class BackendSpec:
    name: str
    description: str
    options: list[list[Any]]
    build: BackendBuilder
    #: On/off options in ``usage.Options.optFlags`` form: ``[long, short, doc]``.
    flags: list[list[Any]] = attrs.field(factory=list)


def optionNames(factory: IBackendFactory) -> set[str]:
    """The long names of every option and flag a backend plugin adds."""
    return {option[0] for option in factory.options} | {flag[0] for flag in getattr(factory, "flags", ())}


def isBuiltin(factory: IBackendFactory) -> bool:
    """Whether ``factory`` is one of cc50tw's own backends (its builder lives in ``cc50tw.backends``)."""
    return str(getattr(factory.build, "__module__", "")).startswith("cc50tw.backends.")


def installed_backends(reserved_options: set[str] = frozenset()) -> dict[str, IBackendFactory]:  # type: ignore[assignment]
    """
    Every backend plugin on ``sys.path``, by name.

    A plugin whose name or options collide with one already found (or with
    ``reserved_options``, the server's own) is skipped with a log line rather
    than allowed to change another backend's meaning.  cc50tw's own backends
    are taken first, so a plugin cannot push one of them out.
    """
    import cc50tw.plugins

    def order(factory: IBackendFactory) -> tuple[bool, str]:
        return (not isBuiltin(factory), str(factory.name))

    backends: dict[str, IBackendFactory] = {}
    taken = set(reserved_options)
    for factory in sorted(getPlugins(IBackendFactory, cc50tw.plugins), key=order):
        names = optionNames(factory)
        if factory.name in backends or names & taken:
            log.warn(
                "ignoring backend plugin {name!r}: its name or options {clash} are already taken",
                name=factory.name,
                clash=sorted(names & taken),
            )
            continue
        backends[factory.name] = factory
        taken |= names
    return backends
