"""
The backends that ship with cc50tw, and how ``twistd cc50`` finds them.

Each backend module describes itself with a ``BackendSpec``: its name, a
line for ``--help``, its own options (in ``usage.Options.optParameters``
form) and a function that builds the ``IBackend`` from the parsed options.
Keeping that in one small record is what lets options, help and validation
come from one place for every backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from cc50tw.interfaces import IBackend

BackendBuilder = Callable[[Mapping[str, Any], Any], IBackend]


@attrs.frozen
class BackendSpec:
    name: str
    description: str
    options: list[list[Any]]
    build: BackendBuilder


#: Modules that each define ``SPEC``; listed by path so that importing this
#: package does not import every backend's dependencies.
BUILTIN_MODULES = ("cc50tw.backends.toy", "cc50tw.backends.llama_server")


def builtin_backends() -> dict[str, BackendSpec]:
    specs: dict[str, BackendSpec] = {}
    for module_name in BUILTIN_MODULES:
        spec: BackendSpec = importlib.import_module(module_name).SPEC
        specs[spec.name] = spec
    return specs
