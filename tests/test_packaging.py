"""environment.yml, the Makefile and pyproject.toml install the same packages; `make lab` starts safely."""
import os
import re
import shlex
import shutil
import subprocess
import tomllib

import pytest

from helpers.env import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = sorted(PYPROJECT["optional-dependencies"])


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\s\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict[str, str]:
    """Every requirement, the optional parts included (make and environment.yml install them all)."""
    requirements = PYPROJECT["dependencies"] + [r for part in EXTRAS for r in PYPROJECT["optional-dependencies"][part]]
    return {_name(r): r.replace(" ", "") for r in requirements}


def _environment_yml() -> dict[str, str]:
    found, in_pip = {}, False
    for line in (REPO_ROOT / "environment.yml").read_text().splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped == "- pip:":
            in_pip = True
        elif in_pip and stripped.startswith("- ") and not stripped.startswith("- -e"):
            requirement = stripped[2:].strip()
            found[_name(requirement)] = requirement.replace(" ", "")
    return found


def test_environment_yml_names_the_same_packages_as_pyproject():
    pyproject, conda = _pyproject(), _environment_yml()
    assert set(conda) == set(pyproject), (set(conda) ^ set(pyproject))
    for name, requirement in pyproject.items():
        if name != "torch":  # torch is pinned exactly in both installers, within pyproject's range
            assert conda[name] == requirement, (name, conda[name], requirement)
    assert conda["torch"] == "torch==2.13.0"


def test_every_dependency_says_which_notebooks_use_it():
    for line in (REPO_ROOT / "pyproject.toml").read_text().splitlines():
        if re.match(r'\s+"[a-z]', line) and "," in line and "=" in line:
            assert "#" in line, f"pyproject dependency without a comment: {line.strip()}"


def test_makefile_installs_the_same_torch_and_ci_runs_make_test():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "TORCH  ?= torch==2.13.0" in makefile
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme


def test_makefile_and_environment_yml_install_every_optional_part():
    makefile = re.findall(r'pip install -q -e "\.\[([\w,]+)\]"', (REPO_ROOT / "Makefile").read_text())
    conda = re.findall(r"- -e \.\[([\w,]+)\]", (REPO_ROOT / "environment.yml").read_text())
    assert [sorted(parts.split(",")) for parts in makefile + conda] == [EXTRAS, EXTRAS], (makefile, conda)


def _lab_command(*make_arguments: str) -> list[str]:
    """The `jupyter lab` command `make lab` would run, printed by `make -n` (nothing is installed or started)."""
    dry = subprocess.run(["make", "-n", "-s", "lab", *make_arguments], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    [line] = [line for line in dry.stdout.splitlines() if "jupyter lab" in line]
    return shlex.split(line)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("uid", [0, 1000, None], ids=["root", "user", "whoever-runs-the-test"])
def test_make_lab_allows_root_only_as_root_on_localhost_with_a_token(uid):
    command = _lab_command(*([f"LAB_UID={uid}"] if uid is not None else []))
    root = (os.getuid() if uid is None else uid) == 0
    assert ("--allow-root" in command) is root, command
    assert "--ip=127.0.0.1" in command, command
    assert not [flag for flag in command if re.search(r"token|password|--ip=(?!127\.0\.0\.1$)", flag)], command
