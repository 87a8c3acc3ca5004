"""Errors a user sees: each names the file, line and column and shows the line."""
from __future__ import annotations

from typing import Optional


class S2Error(Exception):
    """Base of every error s2dsl raises for bad input."""


#: characters of the offending line shown around the column; the rest is cut with "..."
EXCERPT_WIDTH = 100


def _excerpt(text: Optional[str], line: int, column: int) -> str:
    if not text or line < 1:
        return ""
    lines = text.splitlines()
    if line > len(lines):
        return ""
    source = lines[line - 1].expandtabs(1)
    caret = max(column - 1, 0)
    if len(source) > EXCERPT_WIDTH:  # a minified or generated line: show the part around the column
        start = min(max(caret - EXCERPT_WIDTH // 2, 0), max(len(source) - EXCERPT_WIDTH, 0))
        end = start + EXCERPT_WIDTH
        head, tail = ("..." if start else ""), ("..." if end < len(source) else "")
        source = head + source[start:end] + tail
        caret = caret - start + len(head)
    return f"\n    {source}\n    {' ' * caret}^"


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
