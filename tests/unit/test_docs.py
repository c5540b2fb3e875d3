"""The documentation stands on its own: a short README, links that resolve, nothing outside.

The README is a newcomer's page; everything else lives in docs/. Every relative link in the
README and in docs/*.md must name a file of this repository (and, with `#anchor`, a heading in
it), and no page may point outside the repository (the folder beside it, where the design used to be).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 320

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OWNED = [*PAGES, REPO / "CHANGELOG.md"]

# [text](target) outside code; images too. Targets with a scheme (https:, mailto:) are external.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        base, n = slug, 1
        while slug in found:
            slug, n = f"{base}-{n}", n + 1
        found.add(slug)
    return found


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def test_the_readme_is_a_short_page() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_there_are_pages_to_check() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "architecture.md", "configuration.md", "operations.md", "support.md",
            "analysts.md", "production.md", "development.md", "security.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        try:
            dest.relative_to(REPO)
        except ValueError:
            broken.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert broken == [], f"{page.relative_to(REPO)}: {broken}"


@pytest.mark.parametrize("page", OWNED, ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_points_outside_the_repository(page: Path) -> None:
    assert page.is_file(), f"{page.relative_to(REPO)} is missing"
    text = page.read_text(encoding="utf-8")
    assert "../" + "shared" not in text  # spelt apart so that this file does not match itself
    assert "DESIGN §" not in text, "the design is docs/architecture.md; cite it by section name"


def test_the_anchor_rule_matches_githubs() -> None:
    """The slug rule above, on headings like ours."""
    page = REPO / "docs" / "security.md"
    anchors = _anchors(page)
    assert "the-admin-api-who-may-read-the-history" in anchors
    assert "tls-always-verified" in anchors


def test_the_code_map_names_every_module() -> None:
    """docs/development.md's layout is where a new engineer starts: a module it does not name
    is a module nobody will find."""
    layout = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
    modules = sorted(
        p.name for p in (REPO / "consumer").glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    )
    missing = [name for name in modules if f"`{name}`" not in layout]
    assert missing == [], f"modules missing from docs/development.md's code layout: {missing}"
