"""Markdown tables: what the commands print and write, and the benchmarks' sections.

One implementation, used by ``protogmm`` (demo, compare, diagnose, eval) and by every
script under ``benchmarks/``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["markdown_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table.

    Args:
        header: the column titles.
        rows: the cells, already formatted, one sequence per row (as long as ``header``).

    Raises:
        ValueError: a row's length differs from the header's (names the row).
    """
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"markdown_table: row {index} has {len(row)} cells, the header {len(header)}"
            )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
