"""Every module `src/` imports is declared: by the core dependencies, or by the extra of the feature that imports it
(the test and docs extras do not count).

A module that only arrives through another package (torchao through litert-torch, starlette through fastapi)
breaks the day that package stops bringing it. The check reads every import statement and every module named to
`importlib.import_module` / `find_spec` in a string, maps each to the distribution that provides it, and looks that
distribution up in pyproject.toml. Names that resolve nowhere here (MindSpore lives in an environment of its own)
come from KNOWN_DISTRIBUTIONS."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mobilenetv2"
KNOWN_DISTRIBUTIONS = {"mindspore": "mindspore"}  # importable only from its own environment (Makefile: mindspore)
LOADERS = {"import_module", "find_spec"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(source: str) -> set[str]:
    """The top-level names of the absolute imports in `source`, and of modules named in a string literal to
    importlib.import_module / importlib.util.find_spec."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in LOADERS and "{" not in node.args[0].value:
                found.add(node.args[0].value.split(".")[0])
    return found


def third_party(modules: set[str]) -> set[str]:
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("mobilenetv2", "__future__")}


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        if name not in ("test", "docs"):  # the suite's and the site's tools: no feature of the package
            requirements += extra
    return {normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)) for requirement in requirements}


def undeclared(files: dict[str, str]) -> dict[str, list[str]]:
    """module -> the files importing it, for every third-party module no declared distribution provides."""
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing: dict[str, list[str]] = {}
    for name, source in files.items():
        for module in third_party(imported_modules(source)):
            distributions = providers.get(module) or [KNOWN_DISTRIBUTIONS.get(module, module)]
            if not any(normalized(d) in declared for d in distributions):
                missing.setdefault(module, []).append(name)
    return missing


def package_sources() -> dict[str, str]:
    return {str(path.relative_to(PACKAGE)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_the_package_imports_is_declared():
    assert undeclared(package_sources()) == {}


def test_an_undeclared_import_is_found_in_every_form_it_takes():
    sources = package_sources()
    sources["planted.py"] = ("import attr\nfrom networkx import Graph\n"
                             "def f():\n    return importlib.import_module('jinja2')\n")
    found = undeclared(sources)
    assert found == {"attr": ["planted.py"], "networkx": ["planted.py"], "jinja2": ["planted.py"]}
