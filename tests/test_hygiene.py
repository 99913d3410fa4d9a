"""Notebook hygiene: stripped outputs, a lesson per notebook, the README table, badges and local links."""
import json
import re
import shutil
import subprocess
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


def _as_git_holds_it(path: Path) -> str:
    """The file as git holds it (the index: what is committed or staged), else as it is on disk.

    A learner's JupyterLab saves outputs into the working copy; those are not the course's, so they must not
    fail `make test`. Outside a git checkout (a downloaded zip), or for a file git does not track yet, the
    file on disk is all there is.
    """
    if shutil.which("git"):
        shown = subprocess.run(["git", "show", f":./{path.name}"], cwd=path.parent, capture_output=True)
        if shown.returncode == 0:
            return shown.stdout.decode("utf-8")
    return path.read_text(encoding="utf-8")


def _unstripped_cells(notebook_text: str) -> list[int]:
    cells = json.loads(notebook_text)["cells"]
    return [i for i, cell in enumerate(cells)
            if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    unstripped = _unstripped_cells(_as_git_holds_it(path))
    assert not unstripped, f"{path.name}: cells {unstripped} are committed or staged with outputs or execution counts"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_stripped_check_reads_what_git_holds_not_a_learners_saved_outputs(tmp_path):
    notebook = {"cells": [{"cell_type": "markdown", "id": "a", "metadata": {}, "source": ["# 00"]},
                          {"cell_type": "code", "execution_count": None, "id": "b", "metadata": {}, "outputs": [],
                           "source": ["print('hi')"]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    stripped = json.dumps(notebook, indent=1) + "\n"
    output = {"name": "stdout", "output_type": "stream", "text": ["hi"]}
    notebook["cells"][1] |= {"execution_count": 1, "outputs": [output]}
    run = json.dumps(notebook, indent=1) + "\n"

    checkout, download = tmp_path / "checkout", tmp_path / "download"
    for folder in (checkout, download):
        folder.mkdir()
        (folder / "00.ipynb").write_text(stripped, encoding="utf-8")
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    subprocess.run(["git", "add", "00.ipynb"], cwd=checkout, check=True)
    (checkout / "00.ipynb").write_text(run, encoding="utf-8")  # the learner ran the notebook and it autosaved
    assert _unstripped_cells(_as_git_holds_it(checkout / "00.ipynb")) == []
    subprocess.run(["git", "add", "00.ipynb"], cwd=checkout, check=True)  # ... and staged the run: that must fail
    assert _unstripped_cells(_as_git_holds_it(checkout / "00.ipynb")) == [1]
    (download / "00.ipynb").write_text(run, encoding="utf-8")  # no git: the file on disk is checked
    assert _unstripped_cells(_as_git_holds_it(download / "00.ipynb")) == [1]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_its_lesson_and_badge(path):
    assert (REPO_ROOT / "lessons" / f"{path.stem}.md").is_file(), f"no lessons/{path.stem}.md"
    header = "".join(_cells(path)[0]["source"])
    slug = REPOSITORY.removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name}"
    assert badge in header, f"{path.name}: first cell needs the Colab badge {badge}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_repository_urls_in_notebooks_come_from_pyproject(path):
    text = _as_git_holds_it(path)  # not a learner's saved outputs
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
