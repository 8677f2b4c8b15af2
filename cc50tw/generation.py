"""
Generation options: what a request may ask of the model beyond its prompt
and length (the model's name, sampling parameters, stop strings, a system
prompt, fields for one kind of upstream), and how they travel on the wire.

Pure, like ``cc50tw.codec``: the options block is the bytes after the
prompt in REQ_INFER, ``<I`` options_len then that many bytes of a UTF-8 JSON
object (docs/protocol.md, "Generation options").  A request without them is
the C++ client's REQ_INFER, byte for byte; a C++ server ignores the block.
Every key is checked here, so a typo or a wrong type is a clear BAD_REQUEST
rather than an option silently not applied.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import attrs

OPTIONS_PREFIX = struct.Struct("<I")

#: Longest options block accepted (stop strings, a system prompt, extra fields).
MAX_OPTIONS_BYTES = 64 * 1024
MAX_STOP_STRINGS = 16


class OptionsError(ValueError):
    """Options a server must refuse with BAD_REQUEST; the message names the option."""


def _number(name: str, low: float, high: float) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionsError(f"option {name!r} must be a number, got {value!r:.40}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise OptionsError(f"option {name!r} must be a number, got {value!r:.40}")
        if not low <= value <= high:
            raise OptionsError(f"option {name!r} must be between {low:g} and {high:g}, got {value!r}")

    return check


def _integer(name: str, low: int, high: int) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionsError(f"option {name!r} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise OptionsError(f"option {name!r} must be between {low} and {high}, got {value!r}")

    return check


def _text(name: str) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and not isinstance(value, str):
            raise OptionsError(f"option {name!r} must be a string, got {value!r}")

    return check


def _stops(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple) or not all(isinstance(item, str) and item for item in value):
        raise OptionsError(f"option 'stop' must be a list of non-empty strings, got {value!r}")
    if len(value) > MAX_STOP_STRINGS:
        raise OptionsError(f"option 'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(value)}")


def _extra(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, Mapping):
        raise OptionsError(f"option 'extra' must be a JSON object, got {value!r}")


def _tuple(value: object) -> object:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else value


@attrs.frozen
class GenerationOptions:
    """One request's options; None (or empty) means the upstream's own default."""

    #: The model the client asks for; the server routes by it (``--config``'s upstreams).
    model: str | None = attrs.field(default=None, validator=_text("model"))
    temperature: float | None = attrs.field(default=None, validator=_number("temperature", 0, 100))
    top_p: float | None = attrs.field(default=None, validator=_number("top_p", 0, 1))
    top_k: int | None = attrs.field(default=None, validator=_integer("top_k", 0, 1 << 20))
    min_p: float | None = attrs.field(default=None, validator=_number("min_p", 0, 1))
    seed: int | None = attrs.field(default=None, validator=_integer("seed", -(1 << 63), (1 << 64) - 1))
    stop: tuple[str, ...] = attrs.field(default=(), converter=_tuple, validator=_stops)
    repeat_penalty: float | None = attrs.field(default=None, validator=_number("repeat_penalty", 0, 100))
    presence_penalty: float | None = attrs.field(default=None, validator=_number("presence_penalty", -100, 100))
    frequency_penalty: float | None = attrs.field(default=None, validator=_number("frequency_penalty", -100, 100))
    #: A system prompt, for chat upstreams (a completion upstream cannot honour it).
    system: str | None = attrs.field(default=None, validator=_text("system"))
    #: Fields passed to the upstream's request body as they are.
    extra: Mapping[str, Any] = attrs.field(factory=dict, validator=_extra)

    def given(self) -> dict[str, Any]:
        """The options that were set, by wire name (what a backend has to honour)."""
        found: dict[str, Any] = {}
        for field in attrs.fields(GenerationOptions):
            value = getattr(self, field.name)
            if value is None or value == () or (field.name == "extra" and not value):
                continue
            found[field.name] = list(value) if isinstance(value, tuple) else value
        return found

    @property
    def empty(self) -> bool:
        # Every request without options shares NO_OPTIONS: the hot path is one identity test.
        return self is NO_OPTIONS or not self.given()


NO_OPTIONS = GenerationOptions()

#: The keys an options block may carry: what HELLO advertises.
OPTION_NAMES = tuple(field.name for field in attrs.fields(GenerationOptions))


def encodeOptions(options: GenerationOptions) -> bytes:
    """The options block (prefix included); empty bytes for no options, so such a request is the C++ client's."""
    given = options.given()
    if not given:
        return b""
    try:
        data = json.dumps(given, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError as e:  # NaN or Infinity in 'extra': not JSON, and a strict upstream refuses it
        raise OptionsError(f"options must be plain JSON: {e}") from None
    if len(data) > MAX_OPTIONS_BYTES:
        raise OptionsError(f"options take {len(data)} bytes; at most {MAX_OPTIONS_BYTES}")
    return OPTIONS_PREFIX.pack(len(data)) + data


def _noDuplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is ambiguous (parsers disagree on which wins): refused."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise OptionsError(f"option {key!r} is given twice")
        found[key] = value
    return found


def _noConstant(name: str) -> Any:
    raise OptionsError(f"options must be plain JSON: a value must be a number, got {name}")


def decodeOptions(block: bytes) -> GenerationOptions:
    """The options in ``block`` (the bytes after the prompt); ``OptionsError`` saying what is wrong."""
    if not block:
        return NO_OPTIONS
    if len(block) < OPTIONS_PREFIX.size:
        raise OptionsError(f"{len(block)} bytes after the prompt; an options block starts with a 4-byte length")
    (size,) = OPTIONS_PREFIX.unpack_from(block)
    if size != len(block) - OPTIONS_PREFIX.size:
        raise OptionsError(f"options_len is {size} but {len(block) - OPTIONS_PREFIX.size} option bytes followed")
    if size > MAX_OPTIONS_BYTES:
        raise OptionsError(f"options take {size} bytes; at most {MAX_OPTIONS_BYTES}")
    try:
        value = json.loads(
            block[OPTIONS_PREFIX.size :].decode("utf-8"), object_pairs_hook=_noDuplicates, parse_constant=_noConstant
        )
    except OptionsError:
        raise
    except RecursionError:
        raise OptionsError("options are nested too deeply to be read as JSON") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise OptionsError(f"options are not a UTF-8 JSON object: {e}") from None
    if not isinstance(value, dict):
        raise OptionsError(f"options must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(OPTION_NAMES))
    if unknown:
        raise OptionsError(
            f"unknown option {unknown[0]!r}; this server knows {', '.join(OPTION_NAMES)} "
            "(put upstream-specific fields in 'extra')"
        )
    try:
        return GenerationOptions(**value)
    except TypeError as e:
        raise OptionsError(f"options: {e}") from None
