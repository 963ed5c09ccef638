"""The documents stay honest: links lead somewhere, every setting is documented.

Pure file checks: no service is needed. The README and ``docs/*.md`` are read
as GitHub renders them: a heading's anchor is its text in lower case, without
punctuation, spaces turned into hyphens, a repeated one suffixed ``-1``, ``-2``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskq.settings import ENV_PREFIX, Settings


def _root() -> Path:
    for directory in Path(__file__).resolve().parents:
        if (directory / "pyproject.toml").is_file():
            return directory
    raise AssertionError("no pyproject.toml above the tests")


ROOT = _root()
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The examples' READMEs (examples/*/README.md): their links are checked too.
EXAMPLES = sorted((ROOT / "examples").glob("*/README.md"))

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target) or [text](target "title"); images too (their target must exist).
_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:


def _prose(text: str) -> Iterator[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose(text):
        match = _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> Iterator[str]:
    """The targets of the Markdown links of a text, outside code."""
    for line in _prose(text):
        yield from _LINK.findall(_CODE_SPAN.sub("", line))


def test_slugs_follow_github() -> None:
    assert slug("Running `scripts/bench`") == "running-scriptsbench"
    assert slug("Issue #14, the enqueue path") == "issue-14-the-enqueue-path"
    assert slug("Owed publishes: the outbox and the relay") == (
        "owed-publishes-the-outbox-and-the-relay"
    )
    text = "# A\n```sh\n# not a heading\n```\n## A\n## B_c\n"
    assert anchors(text) == {"a", "a-1", "b_c"}


def test_links_are_found_outside_code_only() -> None:
    text = '[one](a.md) `[two](b.md)` [three](c.md#x "title")\n```\n[four](d.md)\n```\n'
    assert list(links(text)) == ["a.md", "c.md#x"]


def test_documents_exist() -> None:
    names = {path.name for path in DOCUMENTS}
    wanted = {"architecture.md", "http-api.md", "workers.md", "operations.md"}
    assert names >= {"README.md", "benchmark.md", "glossary.md", *wanted}


@pytest.mark.parametrize(
    "document", [*DOCUMENTS, *EXAMPLES], ids=lambda path: str(path.relative_to(ROOT))
)
def test_relative_links_lead_to_files_and_headings(document: Path) -> None:
    broken = []
    for target in links(document.read_text()):
        if _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no such heading in {linked.name}")
    assert broken == [], f"{document.name}: {broken}"


def test_every_document_is_linked_from_the_readme() -> None:
    readme = set(links((ROOT / "README.md").read_text()))
    for document in DOCUMENTS[1:]:
        assert f"docs/{document.name}" in readme, document.name


def test_every_setting_is_documented_in_operations() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name in Settings.model_fields:
        variable = ENV_PREFIX + name.upper()
        assert f"| `{variable}` |" in operations, variable


def test_the_readme_holds_the_test_command_ci_runs() -> None:
    # .ci/run runs `scripts/test` on a clean clone; the README must show the same
    # command, alone in a shell block, so that what a reader runs is what CI runs.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nexec scripts/test\n" in ci
    assert "```sh\nscripts/test\n```" in (ROOT / "README.md").read_text()


# Applied migrations are checksummed (taskq.migrate refuses a changed one): the comment
# of 0003, applied before its reference was caught, keeps it. This line and only it.
APPLIED_REFERENCES = {
    "sql/migrations/0003_event_history_cost.sql": (
        "--    itself, and the history can be partitioned or pruned on its own (DESIGN §7)."
    ),
}


def references_outside(root: Path, exclude: Path) -> list[str]:
    """``path:line`` of each reference to the design document outside the repository,
    in the documents, the code, the scripts, the tests and the SQL."""
    outside = re.compile(r"\bDESIGN(?:\.md| §)")
    sources = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for folder in ("taskq", "scripts", "tests"):
        sources += [path for path in (root / folder).rglob("*.py") if path.resolve() != exclude]
    scripts = (root / "scripts").iterdir()  # the shell scripts too
    sources += [path for path in scripts if path.is_file() and path.suffix in ("", ".sh")]
    sources += sorted((root / "sql").rglob("*.sql"))
    sources = [path for path in sources if path.is_file()]
    found = []
    for path in sources:
        name = str(path.relative_to(root))
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if outside.search(line) and APPLIED_REFERENCES.get(name) != line:
                found.append(f"{name}:{number}")
    return found


def test_no_reference_to_documents_outside_the_repository() -> None:
    # The design document lives outside the repository: point at docs/ instead.
    assert references_outside(ROOT, Path(__file__).resolve()) == []


def test_the_applied_migrations_references_are_still_there() -> None:
    # An exception that no longer matches would let a new reference in that file pass.
    for name, line in APPLIED_REFERENCES.items():
        assert line in (ROOT / name).read_text().splitlines(), name


def test_a_reference_in_the_sql_is_found(tmp_path: Path) -> None:
    (tmp_path / "sql" / "migrations").mkdir(parents=True)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "sql" / "queries.sql").write_text("-- name: x\n-- see DESIGN §5\nSELECT 1;\n")
    # The applied migration's own line passes; another reference in the same file does not.
    allowed = APPLIED_REFERENCES["sql/migrations/0003_event_history_cost.sql"]
    applied = tmp_path / "sql" / "migrations" / "0003_event_history_cost.sql"
    applied.write_text(f"{allowed}\n-- and DESIGN.md again\n")
    found = references_outside(tmp_path, tmp_path / "none")
    assert found == [
        "sql/migrations/0003_event_history_cost.sql:2",
        "sql/queries.sql:2",
    ]
