"""ComfyUI-Manager installs requirements.txt, pip installs pyproject.toml: both must ask for the same packages."""
import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def requirement_lines(lines):
    return {line.split("#")[0].strip() for line in lines} - {""}


def test_requirements_txt_lists_the_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = requirement_lines((REPO / "requirements.txt").read_text().splitlines())
    assert listed == set(project["dependencies"])
