"""What clients send, read strictly, in one place for every front end: JSON bodies, numbers given as
text, and client strings as a log line may hold them.

- `parse_json`: a body is UTF-8 JSON nested at most `MAX_JSON_DEPTH` levels (the recursive C parser
  stops at the interpreter's recursion limit, which is caught; below it the depth is measured
  exactly, without recursion), with integers of at most `MAX_INTEGER_DIGITS` digits (Python refuses
  to convert more than 4300, and a product of such dimensions would not print either) and no lone
  UTF-16 surrogate in a string ("\\ud800" is valid JSON but not text: encoding it fails far from the
  parser). A refusal is INVALID_ARGUMENT naming the field by its path in the body (`prompt`,
  `inputs[0].data[0]`).
- `text_error`: the same Unicode check for text that is not JSON (multipart form fields).
- `integer` / `decimal`: a number sent as text, ASCII digits only: Python's `int` and `float`
  also take full-width and superscript digits, underscores and surrounding whitespace.
- `printable`: a client string (a request id, a model name from the URL) as a log line shows it,
  quoted and escaped unless it is a plain token, so that it can neither split the line nor pass for
  one of its fields.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from glm_image_onnx.server import errors

MAX_JSON_BYTES = 16 << 20  # a JSON body (or header) is parsed on the event loop, whole
MAX_JSON_DEPTH = 64  # a KServe tensor of 16 dimensions as nested lists is 19 levels deep
MAX_INTEGER_DIGITS = 40  # UINT64's largest value has 20
MAX_LOGGED_CHARS = 200  # of one client string in a log line

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a surrogate enters a JSON string
_INTEGER = re.compile(r"[-+]?[0-9]+")
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_PLAIN = re.compile(r"[A-Za-z0-9_.:/#@%+\[\]-]+")  # a log token that needs no quoting


class _LongInteger:
    """Stands in the parsed body for an integer with too many digits, until its path is found."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))


def _depth(body: bytes) -> int:
    """How deep arrays and objects nest in a valid JSON text, strings aside; at C speed (a regex,
    bytes.translate, numpy over 1 MiB chunks): the body may be hundreds of megabytes."""
    brackets = np.frombuffer(_STRING.sub(b"", body).translate(None, _NOT_BRACKET), np.uint8)
    deepest = level = 0
    for start in range(0, len(brackets), 1 << 20):
        chunk = brackets[start: start + (1 << 20)]
        levels = level + np.cumsum(np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1))
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def _bad_value(value: Any) -> str | None:
    if isinstance(value, _LongInteger):
        return f"an integer of {value.digits} digits, more than the {MAX_INTEGER_DIGITS} this server reads"
    return text_error(value) if isinstance(value, str) else None


def _find_bad(value: Any) -> tuple[str, str] | None:
    """(path, why) of the first value or key that `_bad_value` refuses, in document order."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            for key in item:
                if (why := text_error(key)) is not None:
                    return path, f"the key {printable(key)} holds {why}"
            stack.extend((f"{path}.{printable(k)}" if path else printable(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
        elif (why := _bad_value(item)) is not None:
            return path, why
    return None


def parse_json(body: bytes) -> Any:
    """A JSON request body (or a KServe infer body's JSON header), read strictly (see the module)."""
    if len(body) > MAX_JSON_BYTES:  # Python holds a JSON number in 16-32 bytes: 2 bytes of text become 30
        raise errors.too_large(f"the JSON part of the request is {len(body)} bytes, more than {MAX_JSON_BYTES}; send "
                               "large tensors with the binary tensor extension (Inference-Header-Content-Length)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.invalid(f"the request body is not UTF-8 ({e.reason} at byte {e.start})") from None
    too_deep = errors.invalid(f"the request body nests JSON arrays and objects more than {MAX_JSON_DEPTH} levels "
                              "deep")
    long_integers: list[str] = []

    def read_integer(literal: str) -> Any:
        if len(literal.lstrip("-")) > MAX_INTEGER_DIGITS:
            long_integers.append(literal)
            return _LongInteger(literal)
        return int(literal)

    try:
        value = json.loads(text, parse_int=read_integer)
    except json.JSONDecodeError as e:
        raise errors.invalid(f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # the C parser's own bound (the interpreter's recursion limit), far past ours
        raise too_deep from None
    # Ours, exact, once the JSON is known valid: `_depth` strips its strings with a regex that is linear
    # only when every string is terminated (an unterminated one would be rescanned from each quote).
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    if long_integers or ("\\u" in text and _SURROGATE_ESCAPE.search(text)):  # rare: only then is the tree walked
        found = _find_bad(value)
        if found is not None:
            path, why = found
            raise errors.invalid(f"{path or 'the request body'}: {why}", path or None)
    return value


def text_error(text: str) -> str | None:
    """Why `text` is not Unicode text (a lone surrogate cannot be encoded as UTF-8), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone UTF-16 surrogate ({text[e.start]!a}) at character {e.start}, which is not text"
    return None


def integer(text: str) -> int | None:
    """`text` as an integer if it is one in ASCII decimal digits (an optional sign) and short enough
    to convert, else None."""
    if len(text) > MAX_INTEGER_DIGITS + 1 or not _INTEGER.fullmatch(text):
        return None
    return int(text)


def decimal(text: str) -> float | None:
    """`text` as a number if it is one in ASCII decimal notation (`1`, `-0.5`, `2e-3`), else None."""
    return float(text) if len(text) <= 64 and _DECIMAL.fullmatch(text) else None


def printable(value: object) -> str:
    """A client string for a log line: as is when it is a plain token, else quoted with every
    control character escaped (repr), cut at MAX_LOGGED_CHARS."""
    text = str(value)
    if _PLAIN.fullmatch(text) and len(text) <= MAX_LOGGED_CHARS:
        return text
    cut = text[:MAX_LOGGED_CHARS]
    return repr(cut) + ("..." if len(text) > len(cut) else "")
