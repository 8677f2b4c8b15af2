"""
Backends, and how ``twistd cc50`` finds them.

Every backend, cc50tw's own included, is a ``BackendSpec`` published as a
Twisted plugin in the ``cc50tw.plugins`` package (or, for third parties, in
the ``cc50tw.backends`` entry point group, which editable installs keep): its name, a line for
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
from types import ModuleType
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


#: The ``importlib.metadata`` entry point group that also publishes backends:
#: unlike ``cc50tw/plugins/`` modules, entry points survive ``pip install -e``.
ENTRY_POINT_GROUP = "cc50tw.backends"


@attrs.define
class Discovery:
    """
    What backend discovery found: the backends, and why anything else was left out.

    ``problems`` are kept so that ``--backend=NAME`` for a plugin that failed
    to import, or was skipped for a clash, can say so instead of just
    "unknown backend".
    """

    backends: dict[str, IBackendFactory] = attrs.field(factory=dict)
    problems: list[str] = attrs.field(factory=list)


def _describeError(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _pluginModuleFailures() -> list[str]:
    """
    Import every module of the ``cc50tw.plugins`` package and report the ones that fail.

    ``getPlugins`` only logs such a failure, before twistd has started its
    log, so it would otherwise be lost.  Modules that import are cached in
    ``sys.modules``, so ``getPlugins`` does not import them twice.
    """
    from twisted.python.modules import getModule

    failures: list[str] = []
    for module in getModule("cc50tw.plugins").iterModules():
        try:
            module.load()
        except Exception as e:
            name = module.name.rsplit(".", 1)[-1]
            failures.append(f"plugin module {name} ({module.filePath.path}) failed to import: {_describeError(e)}")
    return failures


def _entryPointBackends(problems: list[str]) -> list[IBackendFactory]:
    """
    Backends published in the ``cc50tw.backends`` entry point group.

    An entry point names a ``BackendSpec`` (``echo = cc50_echo.backend:SPEC``)
    or a module holding some; one that fails to load is reported in
    ``problems``.
    """
    from importlib.metadata import entry_points

    found: list[IBackendFactory] = []
    for entryPoint in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {entryPoint.name} = {entryPoint.value}"
        try:
            loaded = entryPoint.load()
        except Exception as e:
            problems.append(f"{where} failed to import: {_describeError(e)}")
            continue
        if IBackendFactory.providedBy(loaded):
            found.append(loaded)
            continue
        inModule = (
            [value for value in vars(loaded).values() if IBackendFactory.providedBy(value)]
            if isinstance(loaded, ModuleType)
            else []
        )
        if inModule:
            found.extend(inModule)
        else:
            problems.append(f"{where} is not a backend: {loaded!r} does not provide IBackendFactory")
    return found


def discoverBackends(reserved_options: set[str] = frozenset()) -> Discovery:  # type: ignore[assignment]
    """
    Every backend plugin on ``sys.path``, by name, and what went wrong finding the others.

    Backends come from the ``cc50tw.plugins`` plugin package and from the
    ``cc50tw.backends`` entry point group (which ``pip install -e`` also
    registers).  A plugin whose name or options collide with one already
    found (or with ``reserved_options``, the server's own) is skipped with a
    log line rather than allowed to change another backend's meaning.
    cc50tw's own backends are taken first, so a plugin cannot push one of
    them out.  The same spec found both ways counts once.
    """
    import cc50tw.plugins

    def order(factory: IBackendFactory) -> tuple[bool, str]:
        return (not isBuiltin(factory), str(factory.name))

    discovery = Discovery()
    discovery.problems.extend(_pluginModuleFailures())
    candidates = list(getPlugins(IBackendFactory, cc50tw.plugins)) + _entryPointBackends(discovery.problems)
    backends = discovery.backends
    taken = set(reserved_options)
    for factory in sorted(candidates, key=order):
        if backends.get(factory.name) is factory:
            continue
        names = optionNames(factory)
        if factory.name in backends or names & taken:
            clash = sorted(names & taken)
            log.warn(
                "ignoring backend plugin {name!r}: its name or options {clash} are already taken",
                name=factory.name,
                clash=clash,
            )
            what = f"options {', '.join('--' + name for name in clash)} clash" if clash else "name clashes"
            discovery.problems.append(
                f"backend plugin {factory.name!r} ({getattr(factory.build, '__module__', '?')}) was skipped: "
                f"its {what} with an installed backend's or the server's"
            )
            continue
        backends[factory.name] = factory
        taken |= names
    return discovery


def installed_backends(reserved_options: set[str] = frozenset()) -> dict[str, IBackendFactory]:  # type: ignore[assignment]
    """Every backend plugin found, by name (``discoverBackends`` without the problems)."""
    return discoverBackends(reserved_options).backends
