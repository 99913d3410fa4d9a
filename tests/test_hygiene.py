"""Notebook hygiene: stripped outputs, a lesson per notebook, the README table, badges and local links."""
import json
import re
import tomllib
from pathlib import Path
from urllib.parse import unquote

import pytest

from helpers.env import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REPOSITORY = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "lessons").glob("*.md")), REPO_ROOT / "CONTRIBUTING.md",
             REPO_ROOT / "data" / "README.md"]


def _cells(path):
    return json.loads(path.read_text())["cells"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_its_lesson_and_badge(path):
    assert (REPO_ROOT / "lessons" / f"{path.stem}.md").is_file(), f"no lessons/{path.stem}.md"
    header = "".join(_cells(path)[0]["source"])
    slug = REPOSITORY.removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name}"
    assert badge in header, f"{path.name}: first cell needs the Colab badge {badge}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_repository_urls_in_notebooks_come_from_pyproject(path):
    text = path.read_text()
    for url in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", text):
        assert url.removesuffix(".git") == REPOSITORY, f"{path.name} names {url}, pyproject says {REPOSITORY}"


def test_readme_table_lists_every_notebook_in_order():
    readme = (REPO_ROOT / "README.md").read_text()
    listed = re.findall(r"\]\((notebooks/\d\d_[\w]+\.ipynb)\)", readme)
    listed = list(dict.fromkeys(listed))  # first mention of each, in order
    assert listed == [f"notebooks/{p.name}" for p in NOTEBOOKS]


def _local_links(text):
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"^(https?:|mailto:|#)", target):
            yield unquote(target.split("#", 1)[0])


@pytest.mark.parametrize("path", [d for d in DOCUMENTS if d.exists()] + NOTEBOOKS, ids=lambda p: p.name)
def test_local_links_resolve(path):
    if path.suffix == ".ipynb":
        text = "\n".join("".join(c["source"]) for c in _cells(path) if c["cell_type"] == "markdown")
    else:
        text = path.read_text()
    broken = [t for t in _local_links(text) if t and not (path.parent / t).exists()]
    assert not broken, f"{path.relative_to(REPO_ROOT)} links to missing {broken}"
