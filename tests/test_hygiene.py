"""Notebook hygiene: stripped outputs, a lesson per notebook, the README table, badges, local links, the Colab setup."""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote

import pytest

from helpers.env import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NOTEBOOKS_BY_NAME = {path.name: path for path in NOTEBOOKS}
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
REPOSITORY = PYPROJECT["urls"]["Repository"]
# What each notebook's setup cell installs on Colab beyond the course itself (pyproject's optional parts).
COLAB_EXTRAS = {"07_deepspeed_zero.ipynb": "[deepspeed]", "08_multi_gpu_training.ipynb": "[deepspeed]"}
# Notebooks whose full-size run needs a GPU (README's table): Colab opens them on a GPU runtime. T4 is the GPU
# every Colab user can get; the notebook names the larger GPU its full-size recipe wants.
COLAB_GPU = {"04_qlora_training.ipynb"}
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "lessons").glob("*.md")), REPO_ROOT / "CONTRIBUTING.md",
             REPO_ROOT / "data" / "README.md"]


def _cells(path):
    return json.loads(path.read_text())["cells"]


def test_the_notebooks_are_numbered_from_00_without_gaps():
    assert [path.name[:2] for path in NOTEBOOKS] == [f"{n:02d}" for n in range(len(NOTEBOOKS))]
    assert len(NOTEBOOKS) >= 9  # README's table lists nine; test_readme_table_lists_every_notebook_in_order pairs them


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
def test_notebook_opens_with_the_course_template(path):
    """CONTRIBUTING.md's opening: title and badge, the setup cell, the environment report, then `## Configuration`
    and its cell, which silences the known notices, sets SMOKE and names the course's model as a reader types it."""
    from helpers.models import DEFAULT_MODEL

    cells = _cells(path)
    text = ["".join(cell["source"]) for cell in cells]
    code = [i for i, cell in enumerate(cells) if cell["cell_type"] == "code"]
    assert cells[0]["cell_type"] == "markdown" and text[0].startswith(f"# {path.name[:2]} · "), text[0][:80]
    assert "colab-badge" in text[0]
    assert text[code[0]].startswith("# Setup:"), "the first code cell is the setup cell"
    assert "environment_report()" in text[code[1]], "the second code cell reports the environment"
    heading = code[2] - 1
    assert cells[heading]["cell_type"] == "markdown" and text[heading].startswith("## Configuration"), (
        "the third code cell is the configuration, right after a '## Configuration' heading")
    config = text[code[2]]
    assert "quiet_known_warnings()" in config and "SMOKE = smoke()" in config
    assert f'"{DEFAULT_MODEL}"' in config, f"the configuration names the model as {DEFAULT_MODEL!r}, written out"


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
    """Every address of the course itself (any owner: a fork's old address too) is the one in pyproject.toml.
    Addresses of other repositories (the seeds' data, papers' code) are citations and stay."""
    text = _as_git_holds_it(path)  # not a learner's saved outputs
    name = REPOSITORY.rstrip("/").rsplit("/", 1)[1]
    urls = re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", text)
    assert any(url.removesuffix(".git") == REPOSITORY for url in urls), f"{path.name} never names {REPOSITORY}"
    for url in urls:
        if url.removesuffix(".git").rsplit("/", 1)[1] == name:
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


# --- The Colab setup cell (cell 1 of every notebook) ----------------------------------------------------------

def _setup_cell(path) -> str:
    return "".join(_cells(path)[1]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_is_one_cell_with_the_repository_of_pyproject(path):
    cell, first = _setup_cell(path), _setup_cell(NOTEBOOKS[0])
    extras = COLAB_EXTRAS.get(path.name, "")
    assert re.search(rf'^EXTRAS = "{re.escape(extras)}"  #', cell, re.M), f"{path.name} must install {extras!r}"
    assert re.sub(r'^EXTRAS = "[^"]*"', "", cell, flags=re.M) == re.sub(r'^EXTRAS = "[^"]*"', "", first, flags=re.M)
    assert f'os.environ.get("COURSE_REPO_URL", "{REPOSITORY}")' in cell, f"{path.name}: clone {REPOSITORY}"
    assert not re.search(r"^\s*[!%]", cell, re.M), f"{path.name}: shell magics hide failures; use subprocess"


def test_setup_cell_extras_are_optional_parts_of_pyproject():
    assert {extras.strip("[]") for extras in COLAB_EXTRAS.values()} <= set(PYPROJECT["optional-dependencies"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_asks_for_a_gpu_where_the_full_size_run_needs_one(path):
    metadata = json.loads(path.read_text())["metadata"]
    if path.name in COLAB_GPU:
        assert metadata.get("accelerator") == "GPU" and metadata.get("colab", {}).get("gpuType") == "T4", metadata
    else:
        assert "accelerator" not in metadata and "gpuType" not in metadata.get("colab", {}), metadata


def _run_setup_cell(path, tmp_path, python, before="", after="", **environment) -> subprocess.CompletedProcess:
    """Run a notebook's setup cell as Colab would (forced), cloning this repository's committed HEAD.

    `before` and `after` are code run in the same process, as cells of the same kernel would be.
    """
    script = tmp_path / "setup_cell.py"
    script.write_text(f"{before}\n{_setup_cell(path)}\n{after}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {"COURSE_FORCE_COLAB": "1", "COURSE_REPO_URL": str(REPO_ROOT), "COURSE_DIR": str(tmp_path / "course"),
            **environment}
    return subprocess.run([str(python), str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def _is_git_checkout() -> bool:
    return shutil.which("git") is not None and subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True).returncode == 0


@pytest.mark.skipif(not _is_git_checkout(), reason="clones this repository's HEAD: needs a git checkout")
def test_setup_cell_installs_the_course_on_colab_and_leaves_torch_alone(tmp_path):
    import torch

    # A fresh environment that sees this one's packages, as Colab comes with torch & co. preinstalled. (A venv made
    # with --system-site-packages sees the base interpreter's packages, not those of the venv running the tests.)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [path for path in sys.path if Path(path).name in ("site-packages", "dist-packages")]
    (Path(site) / "colab-preinstalled.pth").write_text("".join(f"{path}\n" for path in ours))
    before = [sorted(os.listdir(path)) for path in ours]

    # Offline: every requirement is already there, and the course builds with the setuptools already installed.
    # (pip reads PIP_NO_BUILD_ISOLATION=0 as --no-build-isolation.)
    # torch imported first, so that a cell which changed it would have to say "RESTART NEEDED".
    done = _run_setup_cell(NOTEBOOKS_BY_NAME["07_deepspeed_zero.ipynb"], tmp_path, python, before="import torch",
                           after="import helpers, os; print('next cell:', helpers.__file__, os.getcwd())",
                           PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no restart needed" in done.stdout, done.stdout
    assert f"next cell: {tmp_path / 'course' / 'helpers' / '__init__.py'} {tmp_path / 'course' / 'notebooks'}" \
        in done.stdout, done.stdout  # the notebook's next cells import the clone's helpers, from its notebooks/

    probe = "import helpers, torch; print(helpers.__file__); print(torch.__version__); print(torch.__file__)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}  # no PYTHONPATH: as Colab
    found = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=clean, capture_output=True, text=True,
                           check=True)
    helpers_file, version, torch_file = found.stdout.split()
    assert Path(helpers_file).is_relative_to(tmp_path / "course"), helpers_file  # the clone, installed editable
    assert (version, torch_file) == (torch.__version__, torch.__file__)  # Colab's torch, untouched
    assert [sorted(os.listdir(path)) for path in ours] == before  # nothing changed where the tests run


def test_setup_cell_stops_with_a_fix_when_the_clone_fails(tmp_path):
    done = _run_setup_cell(NOTEBOOKS[0], tmp_path, sys.executable, COURSE_REPO_URL=str(tmp_path / "no-such-repo"))
    assert done.returncode != 0
    assert "RuntimeError: Cloning the course failed" in done.stderr and "Fix: check the address" in done.stderr
    assert not (tmp_path / "course").exists()


def _helpers_imports() -> dict[str, set[str]]:
    """module -> the helpers modules it imports (`from .x`, `from helpers.x`, `import helpers.x`; anywhere in it)."""
    import ast

    graph = {}
    for path in (REPO_ROOT / "helpers").glob("*.py"):
        if path.stem == "__init__":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.level == 1:
                    imported.add(node.module.split(".")[0])
                elif node.level == 0 and node.module.startswith("helpers."):
                    imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("helpers.")}
        graph[path.stem] = imported - {path.stem}
    return graph


def test_helpers_import_only_from_layers_below():
    """helpers.LAYERS orders the modules; each imports only modules listed before it, so there is no circle."""
    from helpers import LAYERS

    order = [module for _, modules in LAYERS for module in modules]
    graph = _helpers_imports()
    assert sorted(order) == sorted(graph), (
        f"helpers.LAYERS must list every module once: missing {sorted(set(graph) - set(order))}, "
        f"listed but absent {sorted(set(order) - set(graph))}, twice {sorted({m for m in order if order.count(m) > 1})}")
    upward = [f"{module} imports {imported}" for module, imports in graph.items() for imported in sorted(imports)
              if order.index(imported) >= order.index(module)]
    assert not upward, "imports that point up the layers of helpers/__init__.py: " + "; ".join(upward)


def test_layer_check_sees_imports_inside_functions_and_absolute_ones():
    graph = _helpers_imports()
    assert "env" in graph["data"]           # `from helpers.env import REPO_ROOT`, absolute
    assert "models" in graph["checks"]      # imported inside strict()


SAVED = re.compile(r"^# saved in (helpers/\w+\.py)", re.M)


def _essential(node):
    """A function or class as code: without its docstring and the argument checks at its top (`if ...: raise ...`)."""
    import ast
    import copy

    node = copy.deepcopy(node)
    for item in [node, *[n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]]:
        body = item.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        while body and isinstance(body[0], ast.If) and not body[0].orelse \
                and all(isinstance(statement, ast.Raise) for statement in body[0].body):
            body = body[1:]
        item.body = body or [ast.Pass()]
    return ast.dump(node, include_attributes=False)


def _saved_cells():
    import ast

    for path in NOTEBOOKS:
        for index, cell in enumerate(_cells(path)):
            source = "".join(cell["source"])
            match = SAVED.match(source) if cell["cell_type"] == "code" else None
            if match:
                yield path, index, match.group(1), [n for n in ast.parse(source).body
                                                    if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def test_code_a_notebook_writes_is_the_code_helpers_keep():
    """d2l's #@save, checked: a cell that starts with `# saved in helpers/x.py` defines the same functions as that
    module (less docstrings and argument checks), so the code a learner reads is the code the course runs."""
    import ast

    saved = list(_saved_cells())
    names = {node.name for _, _, _, nodes in saved for node in nodes}
    assert {"kl_penalized_rewards", "gae", "whiten", "clipped_policy_loss", "value_loss", "ppo_epochs",
            "ppo_step"} <= names, "notebook 09 writes PPO's pieces in its cells"
    for path, index, module, nodes in saved:
        assert nodes, f"{path.name} cell {index} says it is saved in {module} but defines nothing"
        kept = {n.name: n for n in ast.parse((REPO_ROOT / module).read_text(encoding="utf-8")).body
                if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for node in nodes:
            assert node.name in kept, f"{path.name} cell {index}: {node.name} is not in {module}"
            assert _essential(node) == _essential(kept[node.name]), (
                f"{path.name} cell {index}: {node.name} differs from {module}'s; change both")


def test_the_saved_code_check_sees_a_change():
    import ast

    written = ast.parse("def f(x):\n    if x < 0:\n        raise ValueError\n    return x + 1\n").body[0]
    same = ast.parse("def f(x):\n    \"\"\"Docs.\"\"\"\n    return x + 1\n").body[0]
    other = ast.parse("def f(x):\n    return x + 2\n").body[0]
    assert _essential(written) == _essential(same) != _essential(other)


def test_memory_model_is_written_in_the_notebooks():
    """The memory model's formulas are written where they are taught, in cells saved to helpers/memory.py, not
    imported as a black box: notebook 03 a model's parameters from its configuration, the bytes of a quantized matrix
    and LoRA's parameters, notebook 07 what each ZeRO stage keeps per GPU, notebook 14 the activations a block keeps
    per token."""
    written = {node.name: path.name for path, _, module, nodes in _saved_cells() if module == "helpers/memory.py"
               for node in nodes}
    taught = {"count_parameters_from_config": "03_nf4_quantization.ipynb",
              "quantized_bytes": "03_nf4_quantization.ipynb", "lora_parameters": "03_nf4_quantization.ipynb",
              "zero_model_states": "07_deepspeed_zero.ipynb",
              "activation_elements_per_token": "14_speed_and_memory.ipynb"}
    assert {name: written.get(name) for name in taught} == taught
