"""Small markdown renderings of query results, for asset metadata and the CLI."""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

MAX_CELL = 60


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def query_markdown(con: duckdb.DuckDBPyConnection, sql: str, limit: int = 10) -> str:
    """The first ``limit`` rows of ``sql`` as a markdown table."""
    cursor = con.execute(f"SELECT * FROM ({sql}) LIMIT {int(limit)}")
    columns = [d[0] for d in cursor.description]
    return markdown_table(columns, cursor.fetchall())


def bar_chart_markdown(labels: Sequence[str], values: Sequence[float], width: int = 30) -> str:
    """A text bar chart in a code block (renders anywhere markdown does)."""
    top = max(values, default=0) or 1
    pad = max((len(str(label)) for label in labels), default=0)
    lines = [
        f"{str(label).ljust(pad)} {'█' * max(1, round(width * v / top)) if v else ''} {v:,.0f}"
        for label, v in zip(labels, values, strict=True)
    ]
    return "```\n" + "\n".join(lines) + "\n```"
