"""Hostile JSONL lines that every reader (run, submit, serve) must turn into one line error, never a traceback.

Each is (id, raw line bytes without the newline, words the error says after "invalid JSON: ").
"""

from __future__ import annotations

POISON_LINES: list[tuple[str, bytes, str]] = [
    ("deep-array", b"[" * 100_000, "nested too deeply"),
    ("deep-object", b'{"a": ' * 100_000, "nested too deeply"),
    ("bad-utf8", b'{"prompt": "caf\xe9 \xff"}', "invalid UTF-8 byte 0xe9"),
    ("nul-in-string", b'{"prompt": "a\x00b"}', "Invalid control character"),
    ("nul-outside", b'{"prompt": "ab"}\x00', "Extra data"),
    ("huge-exponent", b'{"prompt": "x", "temperature": 1e999999}', "the number 1e999999 is too large"),
    ("huge-negative", b'{"prompt": "x", "seed": -1e999999}', "the number -1e999999 is too large"),
    ("million-digit-int", b'{"prompt": "x", "seed": 1' + b"0" * 1_000_000 + b"}", "a number has too many digits"),
    ("nan", b'{"prompt": "x", "temperature": NaN}', "NaN is not a JSON value"),
    ("infinity", b'{"prompt": "x", "temperature": -Infinity}', "-Infinity is not a JSON value"),
]
POISON_IDS = [p[0] for p in POISON_LINES]


def poisoned_file(good: bytes, poison: bytes) -> bytes:
    """A good line 1, the poison on line 2, a good line 3."""
    return good + b"\n" + poison + b"\n" + good + b"\n"
