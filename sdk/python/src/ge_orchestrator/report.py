"""The text of a report: storable by PostgreSQL and within the orchestrator's field cap.

A report whose ``result`` or ``error`` is over the orchestrator's ``GE_MAX_FIELD_BYTES``
(64 KiB by default) is dead-lettered, and its work package then stays ``dispatched`` until its
deadline (or for ever without one). :func:`fit` cuts a text to the cap the way the reference
agent does: its beginning and its end, with ``[... N bytes cut ...]`` between them, cut on
character boundaries; NUL, which PostgreSQL cannot store in text, becomes U+FFFD; trailing
whitespace goes.
"""

from __future__ import annotations

import json
from typing import Any, Union

__all__ = ["DEFAULT_MAX_REPORT_BYTES", "fit", "to_text"]

#: The orchestrator's default ``GE_MAX_FIELD_BYTES``.
DEFAULT_MAX_REPORT_BYTES = 64 << 10


def _marker(cut: int) -> str:
    return f"[... {cut} bytes cut ...]"


def _clean(text: Union[str, bytes]) -> str:
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    else:
        # Lone surrogates cannot be encoded as UTF-8: replace them like bad bytes.
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text.replace("\0", "\ufffd")


def _head(b: bytes, n: int) -> bytes:
    """The longest start of UTF-8 ``b`` of at most ``n`` bytes that ends on a character."""
    n = max(0, min(n, len(b)))
    while 0 < n < len(b) and (b[n] & 0xC0) == 0x80:
        n -= 1
    return b[:n]


def _tail(b: bytes, n: int) -> bytes:
    """The longest end of UTF-8 ``b`` of at most ``n`` bytes that starts on a character."""
    n = max(0, min(n, len(b)))
    start = len(b) - n
    while start < len(b) and (b[start] & 0xC0) == 0x80:
        start += 1
    return b[start:]


def fit(prefix: str, output: Union[str, bytes], cap: int = DEFAULT_MAX_REPORT_BYTES) -> str:
    """``prefix`` then ``output``, in at most ``cap`` bytes of UTF-8."""
    whole = (_clean(prefix) + _clean(output)).rstrip()
    b = whole.encode("utf-8")
    if len(b) <= cap:
        return whole
    budget = cap - len(_marker(len(b)))
    if budget < 0:
        return _head(b, cap).decode("utf-8")
    head = _head(b, budget // 2)
    tail = _tail(b, budget - len(head))
    cut = len(b) - len(head) - len(tail)
    return head.decode("utf-8") + _marker(cut) + tail.decode("utf-8")


def to_text(value: Any) -> str:
    """What a handler returned, as the text of ``result``: text as it is, bytes decoded
    (what is not UTF-8 as U+FFFD), None as the empty text, anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return json.dumps(value, ensure_ascii=False, default=str)
