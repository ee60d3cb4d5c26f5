"""The documentation's shape: a README a newcomer reads in ten minutes, with the two commands
near the top, every page under docs/ linked from it, and no relative link (README or docs/)
pointing at a file or heading that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(path: Path) -> str:
    """The text outside fenced and indented code blocks, where a link is a link."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced and not line.startswith("    "):
            out.append(line)
    return "\n".join(out)


def _links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def _anchors(path: Path) -> set[str]:
    """GitHub's ids for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    ids = set()
    for line in _prose(path).splitlines():
        if m := re.match(r"#+ (.*)", line):
            ids.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return ids


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_the_two_commands_come_first() -> None:
    lines = README.read_text().splitlines()
    commands = [i for i, ln in enumerate(lines) if ln.startswith("    ./scripts/")]
    assert [lines[i].strip() for i in commands] == ["./scripts/run.sh", "./scripts/test.sh"]
    assert commands[-1] < 30
    for script in ("run.sh", "test.sh"):
        assert (REPO / "scripts" / script).stat().st_mode & 0o111


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in _pages():
        for target in _links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []
