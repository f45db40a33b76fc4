"""The SQL files shipped with the package: macros and the named example questions."""

from __future__ import annotations

import re
from importlib import resources

import duckdb


def read_sql(name: str) -> str:
    return resources.files("warehouse").joinpath(f"sql/{name}").read_text()


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    """The prompt macros (normalize_prompt, lora_tag_names, ...) on this connection."""
    con.execute(read_sql("macros.sql"))


def named_queries(text: str) -> dict[str, str]:
    """Split a file of ``-- name: <name>`` sections into {name: sql}."""
    queries: dict[str, str] = {}
    parts = re.split(r"^--\s*name:\s*(\S+)\s*$", text, flags=re.MULTILINE)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = body.strip().rstrip(";").strip()
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = sql
    return queries


def questions() -> dict[str, str]:
    """The example questions (warehouse/sql/questions.sql) as SQL over the catalog, by name."""
    return named_queries(read_sql("questions.sql"))
