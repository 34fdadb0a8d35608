"""The front page and the docs pages: short README, and every relative link resolves to a
file (and, for a page, to one of its headings)."""

import os
import re

import pytest

from conftest import REPO

PAGES = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs"))
                               if n.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    with open(path, encoding="utf-8") as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_the_readme_is_a_front_page():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        text = re.sub(r"```.*?```|`[^`\n]*`", "", f.read(), flags=re.S)  # Code is not a link.
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.join(REPO, os.path.dirname(page), path) if path else os.path.join(REPO, page)
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{page}: {broken}"
