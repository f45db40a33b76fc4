from __future__ import annotations

import hashlib
import random

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


def test_prompt_id_is_the_sha256_prefix_of_the_text(con):
    for text in ("a dog", "a cat", "ünïcode, 1girl"):
        expected = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        assert q(con, "SELECT prompt_id(?)", text) == expected
    assert q(con, "SELECT prompt_id(NULL)") is None


def test_strip_lora_tags_edge_cases(con):
    cases = {
        "a <lora:x:1> b": "a  b",
        "<lora:a<lora:b>c": "c",  # a tag runs to the first '>'
        "x>y<lora:z:0.5>w": "x>yw",
        "open <lora:never closed": "open <lora:never closed",
        "<lora:a:1> mid <lora:open": " mid <lora:open",
        "<LORA:kept:1> <lora:>": "<LORA:kept:1> ",
        ">>": ">>",
        "": "",
    }
    for raw, expected in cases.items():
        assert q(con, "SELECT strip_lora_tags(?)", raw) == expected, raw
    assert q(con, "SELECT strip_lora_tags(NULL)") is None


# The rules as first written: three regex passes and trim(x, ' ,'). The macros compute the
# same result faster (one regex pass, a split instead of a regex); random text must agree.
REFERENCE_MACROS = r"""
CREATE OR REPLACE MACRO ref_strip(p) AS regexp_replace(p, '<lora:[^>]*>', '', 'g');
CREATE OR REPLACE MACRO ref_normalize(p) AS nullif(trim(regexp_replace(regexp_replace(
    lower(ref_strip(p)), '\s*,(\s*,)+\s*|\s+,\s*', ', ', 'g'),
    '\s\s+|[\t\n\r\f\v]', ' ', 'g'), ' ,'), '');
"""
PIECES = [" ", " ", ",", ", ", " ,", ",,", "\t", "\n", "\v", "\r", "\f", "a", "B", "é", "İ"]
PIECES += ["<lora:", "<LORA:", "<lora", ">", ":", "0.5", "<", "x_1"]


def test_normalize_prompt_equals_the_reference_rules_on_random_text(con):
    rng = random.Random(6)
    texts = ["".join(rng.choices(PIECES, k=rng.randint(0, 24))) for _ in range(50_000)]
    con.execute(REFERENCE_MACROS)
    con.execute("CREATE OR REPLACE TEMP TABLE fuzz AS SELECT unnest(?) AS p", [texts])
    strip_diff, norm_diff, nulls, changed = con.execute(
        """SELECT count_if(strip_lora_tags(p) IS DISTINCT FROM ref_strip(p)),
                  count_if(normalize_prompt(p) IS DISTINCT FROM ref_normalize(p)),
                  count_if(ref_normalize(p) IS NULL), count_if(ref_normalize(p) <> p)
           FROM fuzz"""
    ).fetchone()
    assert (strip_diff, norm_diff) == (0, 0)
    assert 0 < nulls < len(texts) and changed > len(texts) // 2  # the text exercises the rules


def test_lora_name_strips_extension(con):
    assert q(con, "SELECT lora_name('my.style_v2.safetensors')") == "my.style_v2"


def test_named_queries_parsing():
    parsed = named_queries("-- name: a\nSELECT 1;\n-- name: b\n-- comment\nSELECT 2;\n")
    assert parsed == {"a": "SELECT 1", "b": "-- comment\nSELECT 2"}
    with pytest.raises(ValueError, match="empty"):
        named_queries("-- name: a\n\n")
    assert len(questions()) >= 7
