"""The one Markdown table writer of the commands and the benchmarks."""

from __future__ import annotations

import pytest

from protogmm.reports import markdown_table


def test_markdown_table_layout() -> None:
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]) == (
        "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"
    )


def test_a_row_of_another_length_is_one_line_naming_it() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        markdown_table(["a", "b"], [["1", "2"], ["3"]])
