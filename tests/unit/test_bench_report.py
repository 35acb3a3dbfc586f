"""bench/report.py: a benchmark replaces only its own section of the results file."""

from __future__ import annotations

from pathlib import Path

from bench.report import Figure, machine, table, write_section

A = ("<!-- a:begin -->", "<!-- a:end -->")
B = ("<!-- b:begin -->", "<!-- b:end -->")


def test_sections_are_appended_then_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section(path, *A, f"{A[0]}\nfirst a\n{A[1]}\n")
    write_section(path, *B, f"{B[0]}\nfirst b\n{B[1]}\n")
    write_section(path, *A, f"{A[0]}\nsecond a\n{A[1]}\n")
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert "first a" not in text and "second a" in text and "first b" in text
    assert text.index("second a") < text.index("first b")  # kept its place


def test_table_rows_and_machine() -> None:
    f = Figure("1", "t")
    f.row("x", ">= 1", "2", True)
    f.row("y", "-", "3", None)
    f.row("z", "<= 1", "5", False)
    lines = table(f.rows)
    assert lines[2].endswith("**PASS** |") and lines[3].endswith("**INFO** |")
    assert lines[4].endswith("**FAIL** |")
    m = machine()
    assert int(m["nproc"]) >= 1 and m["commit"]
