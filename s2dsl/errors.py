"""Errors a user sees: each names the file, line and column and shows the line."""
from __future__ import annotations

from typing import Optional


class S2Error(Exception):
    """Base of every error s2dsl raises for bad input."""


def _excerpt(text: Optional[str], line: int, column: int) -> str:
    if not text or line < 1:
        return ""
    lines = text.splitlines()
    if line > len(lines):
        return ""
    source = lines[line - 1].expandtabs(1)
    return f"\n    {source}\n    {' ' * max(column - 1, 0)}^"


class S2SourceError(S2Error):
    """An error at a place in a .s2 file."""

    kind = "error"

    def __init__(self, message: str, *, filename: str = "<string>", text: Optional[str] = None,
                 line: int = 0, column: int = 0, hint: str = ""):
        self.message = message
        self.filename = filename
        self.line = line
        self.column = column
        self.hint = hint
        where = f"{filename}:{line}:{column}" if line else filename
        full = f"{where}: {self.kind}: {message}{_excerpt(text, line, column)}"
        if hint:
            full += f"\n  hint: {hint}"
        super().__init__(full)


class S2SyntaxError(S2SourceError):
    kind = "syntax error"


class S2SemanticError(S2SourceError):
    kind = "error"
