"""The front door of the front end: text or a file -> checked patterns."""
from __future__ import annotations

import os
from typing import Union

from .parser import parse_module
from .semantics import S2File, resolve


def parse(text: str, filename: str = "<string>") -> S2File:
    """Parse and check .s2 source; returns its patterns by name (plus ``.models``)."""
    if not isinstance(text, str):
        raise TypeError(f"s2dsl.parse takes the source text as a str, got {type(text).__name__}; "
                        "use s2dsl.load(path) for a file")
    text = text[1:] if text.startswith("\ufeff") else text  # a byte order mark, as some editors write
    return resolve(parse_module(text, filename), filename, text)


def load(path: Union[str, os.PathLike]) -> S2File:
    """Parse and check a .s2 file."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        return parse(f.read(), path)
