"""
Backends, and how ``twistd cc50`` finds them.

Every backend, cc50tw's own included, is a ``BackendSpec`` published as a
Twisted plugin in the ``cc50tw.plugins`` package: its name, a line for
``--help``, its own options (``usage.Options.optParameters`` form) and a
function that builds the ``IBackend`` from the parsed options.  Nothing
special-cases the built-in ones.
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


@implementer(IPlugin, IBackendFactory)
@attrs.frozen
class BackendSpec:
    name: str
    description: str
    options: list[list[Any]]
    build: BackendBuilder


def installed_backends(reserved_options: set[str] = frozenset()) -> dict[str, IBackendFactory]:  # type: ignore[assignment]
    """
    Every backend plugin on ``sys.path``, by name.

    A plugin whose name or options collide with one already found (or with
    ``reserved_options``, the server's own) is skipped with a log line rather
    than allowed to change another backend's meaning.
    """
    import cc50tw.plugins

    backends: dict[str, IBackendFactory] = {}
    taken = set(reserved_options)
    for factory in sorted(getPlugins(IBackendFactory, cc50tw.plugins), key=lambda f: str(f.name)):
        names = {option[0] for option in factory.options}
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
