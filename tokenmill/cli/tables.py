"""Tables that read at any width: a log file, a CI job, an 80-column terminal.

Rich shrinks every column of a table wider than the console, so at 80 columns ``models list`` showed
``smollm2-135m-instr…`` on every row and ``workers`` headers like ``sta…``. Here each column says what it is:
a *key* (what a row is read by or copied into the next command: ids, variants, hosts) is never cut, folded
or dropped; free text may *fold* onto more lines; the other columns are dropped, least useful first, until
the rest fits, and a caption names what was left out. ``--json`` is the form with every field.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

JSON_HAS_ALL = "--json has every field"
FOLD_MIN = 12  # the narrowest a folding column gets: a path split into more pieces stops being readable


@dataclass(frozen=True)
class Column:
    header: str
    key: bool = False
    fold: bool = False
    drop: int | None = None  # order in which it goes when the table is too wide (1 first); None: kept

    def natural(self, cells: Sequence[str | Text]) -> int:
        return max([_width(self.header), *(_width(c) for c in cells)])

    def minimum(self, cells: Sequence[str | Text]) -> int:
        """The width below which this column would cut a header or, unless it folds, a value."""
        if self.key or not self.fold:
            return self.natural(cells)
        longest_word = max(cell_len(w) for w in self.header.split())
        return max(longest_word, min(self.natural(cells), FOLD_MIN))


def _width(cell: str | Text) -> int:
    return max((cell_len(line) for line in str(cell).splitlines()), default=0)


def _overhead(n_columns: int) -> int:
    """Borders and padding of rich's default box: one space each side of a cell, n + 1 rules."""
    return 3 * n_columns + 1


def fit_columns(columns: Sequence[Column], rows: Sequence[Sequence[str | Text]], width: int) -> list[int]:
    """The indexes of the columns that fit in ``width`` (keys always; the others by drop order)."""
    cells = [[row[i] for row in rows] for i in range(len(columns))]
    kept = list(range(len(columns)))
    droppable = sorted((c.drop, i) for i, c in enumerate(columns) if c.drop is not None and not c.key)
    for _, i in droppable:
        if sum(columns[k].minimum(cells[k]) for k in kept) + _overhead(len(kept)) <= width:
            break
        kept.remove(i)
    return kept


def fitted_table(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[str | Text]], width: int, *,
    more: str = JSON_HAS_ALL, sections: Collection[int] = (), run_on: bool = True,
) -> tuple[Table, str | None]:
    """A rich Table of ``rows`` with the columns that fit ``width``, and a note naming the dropped ones.

    ``sections``: indexes of the rows a rule follows (a group's last row). When the keys alone are wider
    than the page, ``run_on`` lets the lines run past it (output that soft-wraps: a log keeps each key on
    one line); otherwise the keys fold (a live view, which would crop them).
    """
    kept = fit_columns(columns, rows, width)
    keys_fit = sum(columns[i].natural([r[i] for r in rows]) for i in kept if columns[i].key) + _overhead(
        sum(1 for i in kept if columns[i].key)) <= width  # fmt: skip
    hidden = [" ".join(c.header.split()) for i, c in enumerate(columns) if i not in kept]
    note = f"not shown at {width} columns: {', '.join(hidden)} ({more})" if hidden else None
    table = Table(title=title)
    for i in kept:
        col = columns[i]
        cells = [row[i] for row in rows]
        if col.fold and not col.key:
            table.add_column(col.header, overflow="fold", min_width=col.minimum(cells))
        elif col.key and not keys_fit and not run_on:
            table.add_column(col.header, overflow="fold")
        else:
            table.add_column(col.header, no_wrap=True, min_width=col.natural(cells))
    for n, row in enumerate(rows):
        table.add_row(*(row[i] for i in kept), end_section=n in sections and n < len(rows) - 1)
    return table, note


def print_fitted(
    console: Console, title: str, columns: Sequence[Column], rows: Sequence[Sequence[str | Text]], *,
    more: str = JSON_HAS_ALL, sections: Collection[int] = (),
) -> None:
    """The table at the console's width, then the note (wrapped at words, unlike data lines)."""
    table, note = fitted_table(title, columns, rows, console.width, more=more, sections=sections)
    console.print(table)
    if note:
        console.print(note, soft_wrap=False)
