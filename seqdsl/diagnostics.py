"""Source spans and user-facing diagnostics.

Every stage of the pipeline reports user mistakes as :class:`SpecError`, a list of
:class:`Diagnostic` each carrying a :class:`Span`. The CLI renders them as

    spec.seq:12:9: error: unknown function 'sigmod'
       12 |   f = sigmod(proj(x, d))
          |       ^~~~~~
       = hint: did you mean 'sigmoid'?

and exits with status 1; no Python traceback unless ``SEQDSL_DEBUG=1``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Span:
    """A half-open region of a source file, 1-based lines and columns."""

    path: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"

    def to(self, other: "Span") -> "Span":
        """The span covering ``self`` up to the end of ``other``."""
        return Span(self.path, self.line, self.col, other.end_line, other.end_col)


#: Span for things that have no source location (CLI overrides, built-in defaults).
NO_SPAN = Span("<none>", 0, 0, 0, 0)


class SourceRegistry:
    """Remembers the text of every file read, so diagnostics can quote source lines."""

    _texts: dict[str, str] = {}

    @classmethod
    def add(cls, path: str, text: str) -> None:
        cls._texts[path] = text

    @classmethod
    def text(cls, path: str) -> str | None:
        return cls._texts.get(path)

    @classmethod
    def line(cls, path: str, line: int) -> str | None:
        text = cls._texts.get(path)
        if text is None or line < 1:
            return None
        lines = text.splitlines()
        return lines[line - 1] if line <= len(lines) else None


@dataclass(frozen=True)
class Diagnostic:
    span: Span
    message: str
    hint: str | None = None
    severity: str = "error"

    def render(self) -> str:
        out = [f"{self.span}: {self.severity}: {self.message}" if self.span.line else
               f"{self.span.path}: {self.severity}: {self.message}"]
        src = SourceRegistry.line(self.span.path, self.span.line)
        if src is not None:
            num = str(self.span.line)
            pad = " " * len(num)
            start = max(self.span.col - 1, 0)
            if self.span.end_line == self.span.line and self.span.end_col > self.span.col:
                width = self.span.end_col - self.span.col
            else:
                width = max(len(src.rstrip()) - start, 1)
            src, start, width = _clip(src.rstrip(), start, width)
            # Tabs before the caret keep their width so the caret lines up.
            lead = "".join(ch if ch == "\t" else " " for ch in src[:start])
            out.append(f" {num} | {src.rstrip()}")
            out.append(f" {pad} | {lead}^{'~' * (width - 1)}")
        if self.hint:
            out.append(f" {' ' * len(str(self.span.line))} = hint: {self.hint}")
        return "\n".join(out)


#: the most characters of a source line a diagnostic shows (a window around the caret)
MAX_SHOWN = 120


def _clip(line: str, start: int, width: int) -> tuple[str, int, int]:
    """A long line cut to :data:`MAX_SHOWN` characters around ``start`` (``...`` where cut),
    with the caret's start and width moved to match."""
    if len(line) <= MAX_SHOWN:
        return line, start, width
    left = max(0, min(start - MAX_SHOWN // 3, len(line) - MAX_SHOWN))
    right = left + MAX_SHOWN
    shown = ("..." if left else "") + line[left:right] + ("..." if right < len(line) else "")
    start = start - left + (3 if left else 0)
    return shown, start, max(1, min(width, MAX_SHOWN - (start - (3 if left else 0))))


class SpecError(Exception):
    """One or more user errors in a spec. The only exception a user mistake may raise."""

    def __init__(self, diagnostics: Diagnostic | Sequence[Diagnostic]):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = sorted(
            dict.fromkeys(diagnostics), key=lambda d: (d.span.path, d.span.line, d.span.col)
        )
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]


def error(span: Span, message: str, hint: str | None = None) -> SpecError:
    return SpecError(Diagnostic(span, message, hint))


@dataclass
class Collector:
    """Accumulates diagnostics so a stage can report every error, not just the first."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def add(self, span: Span, message: str, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(span, message, hint))

    def extend(self, err: SpecError) -> None:
        self.diagnostics.extend(err.diagnostics)

    def guard(self):
        """Context manager: record a SpecError raised inside instead of propagating it."""
        return _Guard(self)

    def raise_if_any(self) -> None:
        if self.diagnostics:
            raise SpecError(self.diagnostics)


class _Guard:
    def __init__(self, collector: Collector):
        self.collector = collector

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, SpecError):
            self.collector.extend(exc)
            return True
        return False


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest candidate, or None when nothing is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else None


def one_of(items: Iterable[str]) -> str:
    items = [f"'{i}'" for i in items]
    if not items:
        return "nothing"
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " or " + items[-1]
