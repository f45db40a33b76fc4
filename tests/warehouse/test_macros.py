from __future__ import annotations

import duckdb
import pytest

from warehouse.sqlfiles import install_macros, named_queries, questions


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect()
    install_macros(c)
    return c


def q(con, sql, *args):
    return con.execute(sql, list(args)).fetchone()[0]


def test_lora_tags_and_weights(con):
    p = "a girl <lora:animeX_v2:0.8>, sky <lora:ink:0.5:0.3> <lora:bare> (masterpiece:1.2)"
    assert q(con, "SELECT lora_tag_names(?)", p) == ["animeX_v2", "ink", "bare"]
    assert q(con, "SELECT lora_tag_weights(?)", p) == [0.8, 0.5, 1.0]
    assert q(con, "SELECT lora_tag_names(?)", "no tags here") == []


def test_normalize_prompt(con):
    raw = "  A Girl,  (Masterpiece:1.2) <lora:x:1> ,  , blue   SKY "
    assert q(con, "SELECT normalize_prompt(?)", raw) == "a girl, (masterpiece:1.2), blue sky"
    assert q(con, "SELECT normalize_prompt(?)", "<lora:x:1>") is None
    assert q(con, "SELECT normalize_prompt(?)", None) is None
    # tags and case do not make two prompts different
    assert q(
        con,
        "SELECT normalize_prompt(?) = normalize_prompt(?)",
        "Dog <lora:a:1>",
        "dog <lora:b:0.3>",
    )


def test_prompt_id_is_stable_and_short(con):
    assert q(con, "SELECT prompt_id('a dog')") == q(con, "SELECT prompt_id('a dog')")
    assert len(q(con, "SELECT prompt_id('a dog')")) == 16
    assert q(con, "SELECT prompt_id('a dog') <> prompt_id('a cat')")


def test_lora_name_strips_extension(con):
    assert q(con, "SELECT lora_name('my.style_v2.safetensors')") == "my.style_v2"


def test_named_queries_parsing():
    parsed = named_queries("-- name: a\nSELECT 1;\n-- name: b\n-- comment\nSELECT 2;\n")
    assert parsed == {"a": "SELECT 1", "b": "-- comment\nSELECT 2"}
    with pytest.raises(ValueError, match="empty"):
        named_queries("-- name: a\n\n")
    assert len(questions()) >= 7
