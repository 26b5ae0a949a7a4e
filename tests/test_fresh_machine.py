"""What a newcomer runs first, from the repository root: nothing at the root may shadow an installed package.

transformers >= 5.25 imports the PyPI package ``kernels`` (``transformers/integrations/hub_kernels.py``, reached through
``transformers.activations``). When the repository kept a top-level ``kernels/`` package, ``python -m ...`` from the
root put the root first on ``sys.path`` and our folder won: ``ImportError: cannot import name 'CUDAProperties' from
'kernels'``. These tests start fresh interpreters with the root as the working directory, as the README's commands do.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "r4b_fast"


def _run_from_root(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _root_import_names() -> list[str]:
    """Every name under which ``import NAME`` could find something at the repository root: folders (regular or
    namespace packages) and ``*.py`` modules."""
    names = []
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(".egg-info") or entry.name == "__pycache__":
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names.append(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.append(entry.stem)
    return sorted(names)


@pytest.mark.parametrize("module", ["bpo", "annealing"])
def test_training_cli_help_from_the_root(module):
    proc = _run_from_root("-m", f"r4b_fast.training.{module}", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"python -m r4b_fast.training.{module}" in proc.stdout


def test_transformers_activations_and_every_family_class_import_from_the_root():
    code = (
        "import transformers.activations\n"
        "from r4b_fast.models.families import FAMILIES\n"
        "for family in FAMILIES:\n"
        "    cls = family.model_class()\n"
        "    print(family.name, cls.__module__, cls.__name__)\n"
    )
    proc = _run_from_root("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {line.split()[0] for line in proc.stdout.splitlines()}
    assert printed == {"r4b", "llava_onevision", "qwen2_5_vl", "qwen3_vl"}


def test_the_pypi_kernels_package_is_the_one_imported_from_the_root():
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("the PyPI package 'kernels' is not installed (transformers < 5.25 does not need it)")
    proc = _run_from_root("-c", "import kernels, transformers.activations; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = Path(proc.stdout.strip()).resolve()
    assert origin != ROOT / "kernels" / "__init__.py", f"'import kernels' found the repository's {origin}"
    assert "site-packages" in origin.parts, f"'import kernels' found {origin}, not the installed package"


def test_no_root_name_shadows_a_package_an_installed_distribution_provides():
    """A root name that an installed distribution also provides (verl's wheel ships a top-level ``tests`` package)
    must resolve, from the root, to the installed package: our folder may only be a namespace portion, which loses to
    a regular package anywhere on the path."""
    provided = importlib.metadata.packages_distributions()
    clashes = sorted(name for name in _root_import_names()
                     if name in provided and set(provided[name]) != {OWN_DISTRIBUTION})  # fmt: skip
    code = ("import importlib.util, sys\n"
            "for name in sys.argv[1:]:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    print(name, spec.origin)\n")  # fmt: skip
    proc = _run_from_root("-c", code, *clashes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.splitlines():
        name, origin = line.split(" ", 1)
        assert origin != "None" and not Path(origin).resolve().is_relative_to(ROOT / name), \
            f"'import {name}' from the root finds the repository's {name}/ ({origin}), not {provided[name]}'s"


def test_no_root_folder_but_the_package_is_a_regular_package():
    """A namespace folder loses to an installed package of the same name; a folder with ``__init__.py`` wins over
    it. Only r4b_fast may be one, so no future dependency can be shadowed (bench/, tests/, docs/ stay plain)."""
    regular = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert regular == ["r4b_fast"], regular
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert modules == ["setup.py"], modules


def test_the_vllm_entry_point_names_a_class_the_module_defines():
    """vLLM loads ``vllm.logits_processors`` entry points; ours must name a module and attribute that exist (the
    module imports vLLM, which is not installed here, so it is read, not imported)."""
    import ast

    points = [p for p in importlib.metadata.entry_points(group="vllm.logits_processors")
              if p.value.startswith("r4b_fast.")]  # fmt: skip
    if not points:
        pytest.skip("r4b_fast's installed metadata predates the entry point (reinstall: pip install -e .)")
    (point,) = points
    module, attr = point.value.split(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}  # fmt: skip
    assert attr in assigned, f"{path.name} defines no {attr}"
