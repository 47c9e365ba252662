"""Facts about the Slicer module read from its files (AST, XML, CMake text): shared by the tests.

The Slicer application cannot run here, so the module is checked statically: what it calls, which
widgets it names, which parameters it stores and which files the extension ships.
"""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set, Tuple

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "Esegeta" / "Esegeta.py"
UI = REPO / "Resources" / "UI" / "Esegeta.ui"
MODULE_CMAKE = REPO / "Esegeta" / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
S4EXT = REPO / "esegeta.s4ext"
CATALOG = REPO / "Esegeta.json"
LIBRARY = REPO / "EsegetaLib"
# Parts of EsegetaLib that run outside Slicer only (trame-slicer web viewer, Ray studies).
NOT_SHIPPED_PACKAGES = ("web", "study")


# Code that runs inside desktop Slicer besides Esegeta.py: the panel's Qt glue, the installers and
# the in-Slicer tests. The static checks cover them all.
SLICER_SIDE = (LIBRARY / "slicer" / "qt_panel.py", LIBRARY / "slicer" / "dependencies.py")
IN_SLICER_TESTS = tuple(sorted((REPO / "Esegeta" / "EsegetaTesting").glob("*.py")))


def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"), filename=str(MODULE))


def slicer_side_tree() -> ast.Module:
    """Esegeta.py, the Slicer-side library modules and the in-Slicer tests as one AST."""
    body = []
    for path in (MODULE,) + SLICER_SIDE + IN_SLICER_TESTS:
        body.extend(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body)
    return ast.Module(body=body, type_ignores=[])


def slicer_util_calls(tree: ast.Module) -> Set[str]:
    """Names used as `slicer.util.<name>` anywhere in the module."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "util" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "slicer"):
            names.add(node.attr)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "slicer.util":
            names.update(alias.name for alias in node.names)
    return names


def ui_widget_names(tree: ast.Module) -> Set[str]:
    """Names used as `self.ui.<name>` or `ui.<name>` (the Qt glue's argument) in `tree`."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ui"
              and not isinstance(node.ctx, ast.Store)):
            names.add(node.attr)
    return names


def ui_widgets() -> Dict[str, str]:
    """Widget name -> class in the .ui file."""
    root = ET.parse(UI).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def ui_parameter_names() -> Dict[str, Tuple[str, str]]:
    """SlicerParameterName -> (widget name, widget class) in the .ui file."""
    root = ET.parse(UI).getroot()
    found = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found[prop.find("string").text] = (widget.get("name"), widget.get("class"))
    return found


def parameter_node_fields(tree: ast.Module) -> Dict[str, ast.expr]:
    """Annotated fields of the class decorated with @parameterNodeWrapper."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {stmt.target.id: stmt.annotation for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in Esegeta.py")


def base_type(annotation: ast.expr) -> str:
    """`Annotated[int, ...]` -> 'int'; `vtkMRMLScalarVolumeNode` -> that name."""
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name) \
            and annotation.value.id == "Annotated":
        first = annotation.slice.elts[0] if isinstance(annotation.slice, ast.Tuple) else annotation.slice
        return base_type(first)
    if isinstance(annotation, ast.Name):
        return annotation.id
    if isinstance(annotation, ast.Attribute):
        return annotation.attr
    return ast.unparse(annotation)


def has_annotation(annotation: ast.expr, name: str) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
               for n in ast.walk(annotation))


def cmake_list(text: str, variable: str) -> List[str]:
    match = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    if not match:
        raise AssertionError(f"set({variable} ...) not found")
    return [item for item in match.group(1).split() if not item.startswith("#")]


def cmake_variable(text: str, variable: str) -> str:
    match = re.search(r'set\(\s*' + re.escape(variable) + r'\s+"([^"]*)"\s*\)', text)
    if not match:
        raise AssertionError(f'set({variable} "...") not found')
    return match.group(1)


def s4ext_fields() -> Dict[str, str]:
    fields = {}
    for line in S4EXT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def library_files_to_ship() -> Tuple[List[str], List[str]]:
    """(python scripts, data files) of EsegetaLib that the extension must ship, repo-relative."""
    scripts, data = [], []
    for path in sorted(LIBRARY.rglob("*")):
        rel = path.relative_to(REPO)
        inner = path.relative_to(LIBRARY).parts
        if not path.is_file() or "__pycache__" in inner or path.suffix in (".pyc", ".pyo"):
            continue
        if len(inner) > 1 and inner[0] in NOT_SHIPPED_PACKAGES:
            continue
        (scripts if path.suffix == ".py" else data).append(rel.as_posix())
    return scripts, data


def module_level_imports(path: Path) -> Set[str]:
    """Modules imported at module level (not inside functions): what importing the file costs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])

    def visit(body):
        for stmt in body:
            if isinstance(stmt, ast.Import):
                found.update(alias.name for alias in stmt.names)
            elif isinstance(stmt, ast.ImportFrom):
                if stmt.level:
                    base = package.split(".")[: len(package.split(".")) - (stmt.level - 1)]
                    module = ".".join(base + ([stmt.module] if stmt.module else []))
                    if stmt.module is not None:
                        found.add(module)
                    # `from package import name`: name may be a submodule (followed if it is a file)
                    found.update(f"{module}.{alias.name}" for alias in stmt.names)
                else:
                    found.add(stmt.module)
                    if stmt.module.startswith("EsegetaLib"):
                        found.update(f"{stmt.module}.{alias.name}" for alias in stmt.names)
            elif isinstance(stmt, (ast.If, ast.Try)):
                visit(stmt.body)
                for handler in getattr(stmt, "handlers", []):
                    visit(handler.body)
                visit(getattr(stmt, "orelse", []))
    visit(tree.body)
    return found


def module_file(name: str) -> Path:
    """EsegetaLib.x.y -> its file (package __init__ or module)."""
    parts = name.split(".")
    candidate = REPO.joinpath(*parts)
    if (candidate / "__init__.py").is_file():
        return candidate / "__init__.py"
    return candidate.with_suffix(".py")


def eager_import_closure(start: Path) -> Dict[str, Set[str]]:
    """Every EsegetaLib module reached through module-level imports from `start`, with the
    third-party modules each imports at module level."""
    seen: Dict[str, Set[str]] = {}
    stack = [start]
    while stack:
        path = stack.pop()
        key = path.relative_to(REPO).as_posix()
        if key in seen:
            continue
        imports = module_level_imports(path)
        seen[key] = {m for m in imports if not m.startswith("EsegetaLib")}
        for name in imports:
            if name.startswith("EsegetaLib"):
                for i in range(1, len(name.split(".")) + 1):  # parents' __init__ run too
                    file = module_file(".".join(name.split(".")[:i]))
                    if file.is_file():
                        stack.append(file)
    return seen


def lazy_import_closure(start: Path) -> Set[str]:
    """Every EsegetaLib module reachable through ANY import (module level or inside functions):
    what a run from the module may load. Repo-relative paths."""
    seen: Set[str] = set()
    stack = [start]
    while stack:
        path = stack.pop()
        key = path.relative_to(REPO).as_posix()
        if key in seen or not path.is_file():
            continue
        seen.add(key)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1]) if path.name != "__init__.py" \
            else ".".join(path.relative_to(REPO).parent.parts)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                    names = [module] + [f"{module}.{a.name}" for a in node.names]
                else:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name and name.startswith("EsegetaLib"):
                    for i in range(1, len(name.split(".")) + 1):
                        file = module_file(".".join(name.split(".")[:i]))
                        if file.is_file():
                            stack.append(file)
    return seen
