"""pyproject.toml declares what the code imports, nothing it does not, and versions that hold here."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml", "scikit-learn": "sklearn"}  # distribution -> import name


def _imports() -> set[str]:
    """Top-level modules imported anywhere in pipeline/ and stages/ (at module level or inside functions)."""
    names = set()
    for path in [*ROOT.glob("pipeline/*.py"), *ROOT.glob("stages/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - {"pipeline", "stages", "benchmarks"} - set(sys.stdlib_module_names)


def test_every_import_is_declared_and_every_dependency_imported():
    def modules(requirements):
        return {IMPORT_NAMES.get(n, n.replace("-", "_")) for n in (Requirement(r).name.lower() for r in requirements)}

    declared = {Requirement(r).name.lower() for r in PROJECT["dependencies"]}
    extras = [r for name, reqs in PROJECT["optional-dependencies"].items() if name != "test" for r in reqs]
    imported = _imports()
    assert imported - modules(PROJECT["dependencies"] + extras) == set(), "imported but not declared"
    assert modules(PROJECT["dependencies"]) - imported == set(), "declared but never imported"
    assert "crc32c" not in declared and "numcodecs" not in declared  # zarr brings its checksum library


def test_the_installed_versions_satisfy_the_declared_ranges():
    for text in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]:
        requirement = Requirement(text)
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (text, installed)
        if requirement.name.lower() in ("torch", "torchvision", "timm", "pillow", "numpy", "zarr"):
            assert any(s.operator == "<" for s in requirement.specifier), f"{text}: replay-relevant, needs a cap"


def test_the_python_requirement_admits_no_version_a_dependency_refuses():
    """Ours starts at 3.11 (hashlib.file_digest); every installed dependency must accept that lowest version."""
    from packaging.specifiers import SpecifierSet

    ours = SpecifierSet(PROJECT["requires-python"])
    lowest = re.fullmatch(r">=(\d+\.\d+)", PROJECT["requires-python"])[1]
    assert ours.contains("3.11") and not ours.contains("3.10")
    for text in PROJECT["dependencies"]:
        theirs = importlib.metadata.metadata(Requirement(text).name).get("Requires-Python")
        assert theirs is None or SpecifierSet(theirs).contains(lowest), (text, theirs)
    assert PROJECT["license"] and PROJECT["scripts"]["distill"] == "pipeline.cli:main"
