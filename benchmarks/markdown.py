"""Number and table formatting shared by the benchmark reports."""

from __future__ import annotations


def num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "**no**"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(row) + " |" for row in rows]
