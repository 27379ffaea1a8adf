"""What the wheel ships: every package under pyeffort/ and nothing from the research tools
(experiments/ is not packaged, and the product never imports it)."""

import pathlib
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).parents[1]
RESEARCH = ("torch_twin", "torch_search", "calibrate", "fetch_botchan", "experiments")
IMPORTS_RESEARCH = re.compile(r"^\s*(from|import) (experiments|torch_\w+|calibrate)\b", re.M)


def _packages() -> list[str]:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return conf["packages"]


def test_the_package_list_is_every_folder_of_pyeffort():
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pyeffort").rglob("__init__.py")
    }
    assert set(_packages()) == found


def test_no_research_code_is_packaged_or_imported():
    for pkg in _packages():
        folder = ROOT.joinpath(*pkg.split("."))
        for f in folder.glob("*.py"):
            assert f.stem not in RESEARCH, f
            text = f.read_text()
            assert "pip download" not in text and '"download"' not in text, f
            assert IMPORTS_RESEARCH.search(text) is None, f


def test_the_shipped_profiles_are_package_data():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = conf["package-data"]["pyeffort.models.profiles"]
    folder = ROOT / "pyeffort" / "models" / "profiles"
    shipped = {p.name for pat in patterns for p in folder.glob(pat)}
    assert {p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")} == shipped
    assert any(n.endswith(".out_weights.safetensors") for n in shipped)
