"""A list response split into its items without decoding them all at once."""

from __future__ import annotations

import json
import re
from typing import Any

_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def split_list(data: bytes) -> tuple[Any, list[bytes]]:
    """A list response's ``metadata`` (decoded) and its ``items`` (each still raw JSON),
    found without decoding the items: for a list whose items nest too deep to decode
    at once. Iterative; raises ValueError when the text is not a list response."""
    depth = 0
    items: list[bytes] = []
    metadata: Any = None
    key = b""
    start = -1  # where the current item (depth 2 inside "items") starts
    in_items = False
    for token in _TOKEN.finditer(data):
        text = token.group()
        if text[:1] == b'"':
            if depth == 1:
                key = text
            continue
        if text in (b"[", b"{"):
            depth += 1
            if depth == 2 and key == b'"items"' and text == b"[":
                in_items, start = True, token.end()
            elif depth == 2 and key == b'"metadata"' and text == b"{":
                start = token.start()
        elif text in (b"]", b"}"):
            if depth == 2 and in_items and text == b"]":
                if data[start : token.start()].strip():
                    items.append(data[start : token.start()])
                in_items = False
            elif depth == 2 and key == b'"metadata"' and text == b"}":
                metadata = json.loads(data[start : token.end()])
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced brackets")
        elif text == b"," and depth == 2 and in_items:
            items.append(data[start : token.start()])
            start = token.end()
    if depth != 0 or not isinstance(metadata, dict):
        raise ValueError("not a list response")
    return metadata, items
