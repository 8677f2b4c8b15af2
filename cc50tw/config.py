"""
``twistd cc50 --config=FILE``: options from a TOML file, and the
``[[upstreams]]`` that route requests by model.

Any command-line option may be set in the file by its long name
(``max-concurrency = 64``, or ``max_concurrency``); each value goes through
the option's own parser, so it is checked exactly as on the command line,
and the command line wins: a key whose option the command line also gives
is not applied at all (a repeatable option's values are replaced, not
added to).  Unknown keys are usage errors naming them, since a misspelt key
silently ignored is a setting the operator believes in and does not have.

``[[upstreams]]`` (with ``default_model``) exist only here: a list of
tables does not fit on a command line.  They replace ``--llama-url`` and
``--openai-url`` (and ``--llama-endpoint``, ``--openai-chat``, ``--model``
and ``--api-key-file``, which each upstream sets for itself), so giving
both is an error rather than a guess at which was meant.
"""

from __future__ import annotations

import getopt
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tomllib
from twisted.python import usage

from cc50tw.backends.http.options import normalizeURL, readKeyFile
from cc50tw.backends.http.routes import DIALECTS, UpstreamRoute

#: The backends that take ``[[upstreams]]``.
ROUTING_BACKENDS = ("llama_server", "openai")
#: Options each upstream sets for itself: refused next to ``[[upstreams]]``.
REPLACED_BY_UPSTREAMS = ("llama-url", "llama-endpoint", "openai-url", "openai-chat", "model", "api-key-file")
#: Options the file cannot set.
NOT_IN_FILE = ("config", "help", "version")
#: The keys of one ``[[upstreams]]`` table.
UPSTREAM_KEYS = ("url", "dialect", "model", "upstream_model", "api_key_file", "weight", "max_concurrency")


class ConfigError(usage.UsageError):
    """The config file is wrong; the message names the file and the key."""


def commandLineOptions(options: usage.Options, argv: Sequence[str]) -> list[tuple[str, str]]:
    """
    The options ``argv`` gives, by long name, as ``parseOptions`` will read them.

    getopt resolves abbreviations (``--max-conc``) and ``--opt VALUE``
    spellings exactly as the real parse will; a command line it cannot read
    gives nothing here, and the real parse reports it.
    """
    try:
        opts, _ = getopt.getopt(list(argv), options.shortOpt, options.longOpt)
    except getopt.error:
        return []
    given = []
    for opt, value in opts:
        name = opt[2:] if opt.startswith("--") else opt[1:]
        name = options.synonyms.get(name, options.synonyms.get(name.replace("-", "_"), name))
        given.append((name, value))
    return given


def applyConfigFile(options: usage.Options, argv: Sequence[str]) -> None:
    """
    Apply the file named by ``--config`` in ``argv`` (if any) to ``options``, before the command line is parsed.

    Sets ``options["upstreams"]`` (a tuple of ``UpstreamRoute``) and
    ``options["default-model"]`` when the file has ``[[upstreams]]``: the
    HTTP backends' builders read them.
    """
    given = commandLineOptions(options, argv)
    paths = [value for name, value in given if name == "config"]
    if not paths:
        return
    path = paths[-1]
    onCommandLine = {name for name, _ in given}
    table = readConfig(path)
    settings: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name in settings:
            raise ConfigError(f"config {path}: {key!r} is set twice (as {key!r} and with '-' or '_')")
        settings[name] = (key, value)
    upstreams = settings.pop("upstreams", (None, None))[1]
    default = settings.pop("default-model", (None, None))[1]
    for name, (key, value) in settings.items():
        if name in NOT_IN_FILE or (name not in options.longOpt and name + "=" not in options.longOpt):
            raise ConfigError(
                f"config {path}: unknown key {key!r}; keys are the long names of twistd cc50's options, "
                "and [[upstreams]] and default_model (see twistd cc50 --help)"
            )
        if name in onCommandLine:
            continue  # the command line wins
        _dispatch(options, path, key, name, value)
    if upstreams is None:
        if default is not None:
            raise ConfigError(f"config {path}: default_model needs [[upstreams]] that serve it")
        return
    backend = next((value for name, value in reversed(given) if name == "backend"), None) or options["backend"]
    if backend not in ROUTING_BACKENDS:
        raise ConfigError(f'config {path}: [[upstreams]] need backend = "llama_server" or "openai", not {backend!r}')
    for name in REPLACED_BY_UPSTREAMS:
        if name in onCommandLine or name in settings:
            raise ConfigError(
                f"--{name} cannot be combined with the [[upstreams]] of config {path}: each upstream sets its own "
                "url, dialect, model and api_key_file"
            )
    routes = parseUpstreams(upstreams, path)
    options["upstreams"] = routes
    options["default-model"] = parseDefaultModel(default, routes, path)


def readConfig(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as configFile:
            return tomllib.load(configFile)
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None


def _text(value: object) -> str:
    """A TOML value as the command line would have spelled it."""
    if isinstance(value, dict):
        return json.dumps(value)  # --llama-extra-body takes a JSON object
    return str(value)


def _dispatch(options: usage.Options, path: str, key: str, name: str, value: object) -> None:
    """Set one option as if given on the command line; its own parser checks the value."""
    dispatcher = options._dispatch[name]
    flag = name in options.longOpt
    try:
        if flag:
            if not isinstance(value, bool):
                raise usage.UsageError(f"must be true or false, got {value!r}")
            if value:
                dispatcher(name, None)
            return
        if isinstance(value, list):
            repeatable = name == "listen" or name in getattr(options, "repeatable", {})
            if not repeatable:
                raise usage.UsageError(f"takes one value, not a list: {value!r}")
            values: list[object] = value
        else:
            values = [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, str | int | float | dict):
                raise usage.UsageError(f"must be a string or a number, got {item!r}")
            if isinstance(dispatcher, usage.CoerceParameter):
                dispatcher.dispatch(name, _text(item))
            else:
                dispatcher(name, _text(item))
    except (usage.UsageError, ValueError) as e:
        raise ConfigError(f"config {path}: {key}: {e}") from None


def parseUpstreams(value: object, path: str) -> tuple[UpstreamRoute, ...]:
    """Every ``[[upstreams]]`` table, checked; errors name the table's index and the key."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"config {path}: upstreams must be a non-empty list of tables ([[upstreams]])")
    base = os.path.dirname(os.path.abspath(path))
    routes: list[UpstreamRoute] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(value):
        where = f"config {path}: upstreams[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table, got {table!r}")
        route = parseUpstream(table, where, base)
        if route.url in seen:
            raise ConfigError(
                f"{where}.url {route.url!r} is upstreams[{seen[route.url]}]'s too; list each upstream once"
            )
        seen[route.url] = index
        routes.append(route)
    return tuple(routes)


def parseUpstream(table: Mapping[str, Any], where: str, base: str = ".") -> UpstreamRoute:
    """One ``[[upstreams]]`` table; ``base``: the directory a relative ``api_key_file`` is in."""
    fields: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in UPSTREAM_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; an upstream takes {', '.join(UPSTREAM_KEYS)}")
        fields[name] = value
    for required in ("url", "dialect", "model"):
        if required not in fields:
            raise ConfigError(f"{where}: {required} is required")
    url = _string(fields["url"], f"{where}.url")
    try:
        url = normalizeURL(url, f"{where}.url")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dialect = _string(fields["dialect"], f"{where}.dialect")
    if dialect not in DIALECTS:
        choices = ", ".join(f'"{name}" ({api})' for name, api in DIALECTS.items())
        raise ConfigError(f"{where}.dialect must be one of {choices}, got {dialect!r}")
    upstreamModel = fields.get("upstream_model")
    weight = fields.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
        raise ConfigError(f"{where}.weight must be a positive number, got {weight!r}")
    limit = fields.get("max_concurrency")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{where}.max_concurrency must be a whole number of at least 1, got {limit!r}")
    keyFile = fields.get("api_key_file")
    return UpstreamRoute(
        url=url,
        dialect=dialect,
        model=_string(fields["model"], f"{where}.model"),
        upstream_model=_string(upstreamModel, f"{where}.upstream_model") if upstreamModel is not None else None,
        api_key=readKey(os.path.join(base, _string(keyFile, f"{where}.api_key_file")), f"{where}.api_key_file")
        if keyFile is not None
        else None,
        weight=float(weight),
        max_concurrency=limit,
    )


def parseDefaultModel(value: object, routes: Sequence[UpstreamRoute], path: str) -> str:
    """``default_model``, which must be one the upstreams serve; without it, the first upstream's."""
    served = list(dict.fromkeys(route.model for route in routes))
    if value is None:
        return served[0]
    model = _string(value, f"config {path}: default_model")
    if model not in served:
        raise ConfigError(
            f"config {path}: default_model {model!r} is served by no upstream; they serve {', '.join(map(repr, served))}"
        )
    return model


def _string(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
    return value


def readKey(path: str, what: str) -> str:
    """The API key in ``path``; ``ConfigError`` naming ``what``."""
    try:
        return readKeyFile(path, what)
    except ValueError as e:
        raise ConfigError(str(e)) from None


__all__ = [
    "ROUTING_BACKENDS",
    "ConfigError",
    "applyConfigFile",
    "commandLineOptions",
    "parseDefaultModel",
    "parseUpstream",
    "parseUpstreams",
    "readConfig",
    "readKey",
]
