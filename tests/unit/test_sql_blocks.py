"""Query blocks name their parameters; each header lists exactly those its statement uses."""

from __future__ import annotations

import re

import pytest

from taskq import sql

LEFT = re.compile(r"""'(?:[^']|'')*'|--[^\n]*|(?<![:\w]):[a-z_]""")


def test_every_block_lists_exactly_the_parameters_it_uses() -> None:
    # Loading checks each block (a mismatch raises); what it yields numbers them all.
    for name, text in sql.queries().items():
        numbers = {int(n) for n in re.findall(r"\$(\d+)", re.sub(r"--[^\n]*", "", text))}
        assert numbers == set(range(1, len(numbers) + 1)), name
        named = [m[0] for m in LEFT.finditer(text) if not m[0].startswith(("'", "--"))]
        assert named == [], (name, named)


def test_names_become_their_place_in_the_header() -> None:
    block = (
        "-- Two ids: :first and :second (prose is left as it is).\n"
        "-- :second uuid, :first text (NULL: none)\n"
        "SELECT :first::text, ARRAY[:second]::uuid[], now()::text, ':first -- not one',\n"
        "       :first -- a comment naming :nothing\n"
    )
    assert sql.positional("b", block) == (
        "-- Two ids: :first and :second (prose is left as it is).\n"
        "-- :second uuid, :first text (NULL: none)\n"
        "SELECT $2::text, ARRAY[$1]::uuid[], now()::text, ':first -- not one',\n"
        "       $2 -- a comment naming :nothing\n"
    )


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ("-- :a\nSELECT :a, :b", "query 'b' uses :b, which its header does not list"),
        ("-- :a, :b\nSELECT :a", "query 'b' never uses :b, which its header lists"),
        ("-- :a, :a\nSELECT :a", "query 'b' lists :a twice"),
        ("-- :a\nSELECT :a, $2", r"query 'b' numbers a parameter \(\$2\): name it"),
        ("SELECT 1;\n-- :a\nSELECT :a", "query 'b' uses :a, which its header does not list"),
    ],
)
def test_a_header_that_disagrees_with_its_statement_is_refused(block: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        sql.positional("b", block)


def test_psycopg_gets_the_same_blocks_with_named_placeholders() -> None:
    block = (
        "-- :second uuid, :first text\n"
        "SELECT :first::text, ARRAY[:second]::uuid[], 5 % 2, '100%', ':first'"
        " -- :first at 50%\n"
    )
    query = sql.pyformat("b", block)
    assert query.text == (
        "-- :second uuid, :first text\n"
        "SELECT %(first)s::text, ARRAY[%(second)s]::uuid[], 5 %% 2, '100%%', ':first'"
        " -- :first at 50%%\n"
    )
    assert query.parameters == ("second", "first")
    assert query.bind(["b", "a"]) == {"second": "b", "first": "a"}
    with pytest.raises(ValueError, match="2 parameters, 1 values"):
        query.bind(["b"])


def test_every_block_compiles_for_psycopg_with_the_asyncpg_parameters() -> None:
    numbered = sql.queries()
    named = sql.psycopg_queries()
    assert named.keys() == numbered.keys()
    for name, query in named.items():
        # The same statement: each %(name)s stands where $n stood, n its place in the header.
        places = {p: f"${n}" for n, p in enumerate(query.parameters, start=1)}
        text = re.sub(r"%\((\w+)\)s", lambda m: places[m[1]], query.text)  # noqa: B023
        assert text.replace("%%", "%") == numbered[name], name


def test_psycopg_blocks_refuse_what_the_asyncpg_ones_refuse() -> None:
    with pytest.raises(ValueError, match="query 'b' never uses :b, which its header lists"):
        sql.pyformat("b", "-- :a, :b\nSELECT :a")
