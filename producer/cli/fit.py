"""Tables that stay readable in a narrow terminal (80 columns).

Rich squeezes every column of a table wider than the terminal alike, so at 80 columns a job's state
became ``runn…`` or nothing while a 32-character id stayed whole. A ``FitTable`` lays its columns out
itself, at render time, for the width it is given:

- ``whole`` columns (an id prefix, a name, an address) are never cut or wrapped;
- ``words`` columns (a state label) wrap at word boundaries, never narrower than their longest word;
- ``cut`` columns (kind, provider, instance) shrink to a few characters with an ellipsis;
- the ``rest`` column (an error) takes what is left and wraps at word boundaries.

A column empty in every row is left out first (before any other is cut); when even the cuts do not fit,
columns with a ``drop`` rank are left out, highest rank first, and the caption says which. Wide enough,
every column shows whole, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

Fit = Literal["whole", "words", "cut", "rest"]
CUT_FLOOR = 6  # a cut column keeps this many characters: "destr…", "hetzn…"
REST_FLOOR = 16  # the error column is not squeezed below this; narrower, columns are dropped


@dataclass(frozen=True)
class Column:
    header: str
    fit: Fit = "whole"
    drop: int = 0  # narrow: columns with a higher rank are left out first; 0 = never left out


class FitTable:
    """A rich renderable: ``columns`` and ``rows`` (cells as markup strings or ``Text``), laid out
    for the width it is rendered at. ``title`` as on a rich ``Table``."""

    def __init__(self, columns: list[Column], rows: Iterable[list[str | Text]], title: str | None = None):
        self.columns = columns
        self.rows = [[cell if isinstance(cell, Text) else Text.from_markup(cell) for cell in row] for row in rows]
        self.title = title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)

    def table(self, width: int) -> Table:
        """The rich Table for ``width`` characters (borders included)."""
        natural = [_natural(i, column, self.rows) for i, column in enumerate(self.columns)]
        shown = list(range(len(self.columns)))
        widths = dict(enumerate(natural))
        empty = [i for i in shown if not any(row[i].plain for row in self.rows)]
        if _need(widths, shown) > width:  # columns with nothing in any row go first, before any is cut
            shown = [i for i in shown if i not in empty]
        if _need(widths, shown) > width:
            widths = {i: _floor(column, natural[i], self.rows, i) for i, column in enumerate(self.columns)}
            ranked = sorted((i for i in shown if self.columns[i].drop), key=lambda i: -self.columns[i].drop)
            for i in ranked:
                if _need(widths, shown) <= width:
                    break
                shown.remove(i)
            spare = width - _need(widths, shown)
            for fit in ("cut", "words", "rest"):  # short columns whole first; the error takes the rest
                for i in shown:
                    if self.columns[i].fit == fit and spare > 0:
                        grow = min(spare, natural[i] - widths[i])
                        widths[i] += grow
                        spare -= grow
        fits = _need(widths, shown) <= width
        table = Table(expand=False, title=self.title)
        for i in shown:
            column = self.columns[i]
            table.add_column(
                column.header,
                width=widths[i] if fits else None,  # too narrow even so: rich squeezes as it can
                no_wrap=column.fit in ("whole", "cut"),
                overflow="ellipsis" if column.fit == "cut" else "fold",
            )
        # Said only for columns that had something to say (an all-empty one leaves nothing unsaid).
        hidden = [c.header for i, c in enumerate(self.columns) if i not in shown and any(r[i].plain for r in self.rows)]
        if hidden:
            table.caption = f"narrow terminal: {', '.join(hidden)} not shown"
        for row in self.rows:
            table.add_row(*(row[i] for i in shown))
        return table


def _need(widths: dict[int, int], shown: list[int]) -> int:
    # Each column: its content, one space of padding each side, one border; plus the closing border.
    return sum(widths[i] for i in shown) + 3 * len(shown) + 1


def _natural(index: int, column: Column, rows: list[list[Text]]) -> int:
    cells = [Text(column.header), *(row[index] for row in rows)]
    return max(max((len(line) for line in cell.plain.splitlines()), default=0) for cell in cells)


def _floor(column: Column, natural: int, rows: list[list[Text]], index: int) -> int:
    """The narrowest a column may get before columns are dropped."""
    if column.fit == "whole":
        return natural
    if column.fit == "cut":
        return min(natural, CUT_FLOOR)
    words = [len(word) for row in rows for word in row[index].plain.split()] or [0]
    longest = max(*words, len(column.header))
    return min(natural, REST_FLOOR) if column.fit == "rest" else longest
