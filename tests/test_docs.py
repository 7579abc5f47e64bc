"""The README and docs/ as a reader meets them: no placeholder left to fill, no link to a file that is not there.

A placeholder («...») is how a figure not yet measured is marked while a section is written; one that reaches main
reads as a result that is missing (three did, in docs/QUANTIZATION.md, for a day).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LOCAL_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)#\s]+)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_no_placeholder_is_left(page):
    lines = [f"{number}: {line.strip()[:80]}" for number, line in enumerate(page.read_text().splitlines(), 1)
             if "«" in line or "»" in line]
    assert not lines, f"{page.name}: placeholders left: {lines}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_local_link_names_a_file_that_exists(page):
    missing = [target for target in LOCAL_LINK.findall(page.read_text())
               if not (page.parent / target).exists()]
    assert not missing, f"{page.name}: links to missing files: {missing}"
