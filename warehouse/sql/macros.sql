-- Prompt macros: used by the derived tables (warehouse/tables.py) and installed in the catalog,
-- so SQL users get the same rules.

-- <lora:name:weight> tags (A1111); extended <lora:name:te:unet> keeps the first weight.
CREATE OR REPLACE MACRO lora_tag_names(p) AS
    regexp_extract_all(p, '<lora:([^:>]+)(?::[^>]*)?>', 1);

-- Weight of each tag in the same order as lora_tag_names; a missing weight means 1.0.
CREATE OR REPLACE MACRO lora_tag_weights(p) AS
    list_transform(
        regexp_extract_all(p, '<lora:[^:>]+(:[^:>]*)?(?::[^>]*)?>', 1),
        lambda w: coalesce(try_cast(nullif(ltrim(w, ':'), '') AS DOUBLE), 1.0)
    );

-- The prompt without its LoRA tags: regexp_replace(p, '<lora:[^>]*>', '', 'g'), 2x faster.
-- A tag cannot contain '>', so it lies in one of the pieces of p split at '>': every piece
-- but the last (which no '>' closes) loses the text from its first '<lora:' on, else it
-- gets its '>' back; the last piece is kept. (pieces[:-2] is all but the last piece.)
CREATE OR REPLACE MACRO strip_lora_tags_of_pieces(pieces) AS
    array_to_string(
        list_transform(pieces[:-2], lambda s:
            CASE WHEN contains(s, '<lora:') THEN left(s, strpos(s, '<lora:') - 1)
                 ELSE s || '>' END),
        '') || pieces[-1];
CREATE OR REPLACE MACRO strip_lora_tags(p) AS strip_lora_tags_of_pieces(string_split(p, '>'));

-- The prompt as people mean it: tags removed, lower case, whitespace and commas tidied.
-- One regex pass rewrites, left to right, a run of commas (with the spaces around it) or a
-- comma with spaces before it into ', ' (\1 or \2 is the comma), and a run of 2+ spaces or
-- one tab/newline/CR/FF/VT into ' ' (no group matched). It matches only what needs rewriting:
-- rewriting every space or comma is 3-5x slower on millions of prompts. The result equals the
-- two passes ', ' then ' ' (tests/warehouse/test_macros.py checks it on random text).
-- Then ' ' and ',' are trimmed at both ends: rtrim(x, ' ,') reads the whole string and is 3x
-- slower than the end-anchored regex.
CREATE OR REPLACE MACRO normalize_prompt(p) AS
    nullif(
        regexp_replace(
            ltrim(
                regexp_replace(
                    lower(strip_lora_tags(p)),
                    '\s*(,)(?:\s*,)+\s*|\s+(,)\s*|\s\s+|[\t\n\r\f\v]', '\1\2 ', 'g'),
                ' ,'),
            '[ ,]+$', ''),
        '');

-- A stable id for a normalised prompt (first 16 hex digits of its SHA-256).
CREATE OR REPLACE MACRO prompt_id(normalized) AS left(sha256(normalized), 16);

-- A LoRA's prompt-tag name: its file name without the extension.
CREATE OR REPLACE MACRO lora_name(file_name) AS
    regexp_replace(file_name, '\.[A-Za-z0-9]+$', '');
