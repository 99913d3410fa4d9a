"""img/: every picture is drawn by img/diagrams.py, is up to date, shows the right numbers, and is shown somewhere."""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMG = REPO / "img"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "lessons").glob("*.md"))]
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]*img/[^)\s]+)\)")


def _diagrams():
    spec = importlib.util.spec_from_file_location("course_img_diagrams", IMG / "diagrams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the script and the folder ----------------------------------------------------------------

def test_every_png_in_img_is_drawn_by_the_script():
    drawn = set(_diagrams().DIAGRAMS)
    present = {path.stem for path in IMG.glob("*.png")}
    assert present == drawn, (f"in img/ but not drawn by diagrams.py: {sorted(present - drawn)}; "
                              f"drawn but missing (run `make diagrams`): {sorted(drawn - present)}")


def _skip_unless_drawn_with_these_versions(module):
    """Bytes match only with the matplotlib and Pillow that drew img/ (each PNG names them)."""
    stamps = {module.drawn_with_of(path) for path in IMG.glob("*.png")}
    if len(stamps) == 1 and stamps != {module.DRAWN_WITH}:
        pytest.skip(f"img/ was drawn by {stamps.pop()}; this is {module.DRAWN_WITH}: run `make diagrams` to redraw")


def test_images_are_what_the_script_draws():
    """`--check` redraws every image into a temporary folder and compares bytes (about 3 s of CPU)."""
    _skip_unless_drawn_with_these_versions(_diagrams())
    result = subprocess.run([sys.executable, "img/diagrams.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def one_diagram(monkeypatch, tmp_path):
    """The script reduced to one cheap picture, with a copy of its image in a folder of its own."""
    module = _diagrams()
    _skip_unless_drawn_with_these_versions(module)
    monkeypatch.setattr(module, "DIAGRAMS", {"zero_stages": module.DIAGRAMS["zero_stages"]})
    shutil.copy(IMG / "zero_stages.png", tmp_path / "zero_stages.png")
    return module, tmp_path


def test_check_passes_on_an_identical_copy(one_diagram, capsys):
    module, folder = one_diagram
    assert module.check(folder) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_names_the_image_that_differs(one_diagram, capsys):
    module, folder = one_diagram
    with open(folder / "zero_stages.png", "ab") as f:
        f.write(b"\0")
    assert module.check(folder) == 1
    assert "img/zero_stages.png: differs" in capsys.readouterr().out


def test_check_names_a_missing_and_a_stray_image(one_diagram, capsys):
    module, folder = one_diagram
    shutil.copy(folder / "zero_stages.png", folder / "old_picture.png")
    assert module.check(folder) == 1
    assert "img/old_picture.png: not drawn by diagrams.py" in capsys.readouterr().out
    (folder / "zero_stages.png").unlink()
    assert module.check(folder) == 1
    assert "img/zero_stages.png: missing" in capsys.readouterr().out


# --- where the pictures are shown ---------------------------------------------------------------

def _image_links():
    return [(doc, target) for doc in DOCUMENTS for target in IMAGE_LINK.findall(doc.read_text(encoding="utf-8"))]


def test_every_image_is_shown_in_the_readme_or_a_lesson():
    shown = {(doc.parent / target).resolve() for doc, target in _image_links()}
    unshown = sorted(path.name for path in IMG.glob("*.png") if path.resolve() not in shown)
    assert not unshown, f"not shown in README.md or lessons/*.md: {unshown}"


def test_every_image_link_in_the_readme_and_lessons_exists():
    broken = [f"{doc.relative_to(REPO)} -> {target}" for doc, target in _image_links()
              if not (doc.parent / target).is_file()]
    assert not broken, broken


# --- the numbers the pictures show --------------------------------------------------------------

def test_nf4_values_are_normal_quantiles_and_equal_bitsandbytes():
    diagrams = _diagrams()
    values = diagrams.nf4_values()
    assert len(values) == 16 and values[0] == -1.0 and values[-1] == 1.0 and values[7] == 0.0
    assert values == sorted(values) and sum(v > 0 for v in values) == 8 and sum(v < 0 for v in values) == 7
    theirs = diagrams.bitsandbytes_nf4()
    if theirs is None:
        pytest.skip("bitsandbytes is not importable here")
    assert max(abs(a - b) for a, b in zip(values, theirs)) < 1e-6  # bitsandbytes keeps float32


def test_bits_per_parameter_as_the_qlora_paper_counts():
    diagrams = _diagrams()
    assert diagrams.bits_per_parameter() == 4.5
    assert diagrams.bits_per_parameter(double=True) == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125


def test_zero_memory_is_the_papers_figure_1():
    """Ψ = 7.5B, N = 64, K = 12: 120, 31.4, 16.6 and 1.9 GB (Rajbhandari et al., Figure 1; lesson 07's table)."""
    diagrams = _diagrams()
    gb = [round(diagrams.zero_bytes_per_device(stage, 7.5e9, 64) / 1e9, 1) for stage in range(4)]
    assert gb == [120.0, 31.4, 16.6, 1.9]


def test_first_fit_packs_the_pictures_examples():
    diagrams = _diagrams()
    blocks = diagrams.first_fit(diagrams.EXAMPLE_LENGTHS, diagrams.BLOCK)
    assert sorted(i for block in blocks for i in block) == list(range(len(diagrams.EXAMPLE_LENGTHS)))
    assert all(sum(diagrams.EXAMPLE_LENGTHS[i] for i in block) <= diagrams.BLOCK for block in blocks)
    assert blocks == [[0, 2, 3], [1, 5], [4], [6, 7]]


def test_course_map_lists_the_notebooks_as_readmes_table_names_them():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = re.findall(r"^\| (\d\d) \| \[([^\]]+)\]\(notebooks/\d\d_\w+\.ipynb\)", readme, re.M)
    notebooks = sorted(path.name[:2] for path in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    course = [(number, name) for number, name, _, _ in _diagrams().COURSE]
    assert course == table, "the course map (COURSE in img/diagrams.py) must follow README's table"
    assert [number for number, _ in course] == notebooks
