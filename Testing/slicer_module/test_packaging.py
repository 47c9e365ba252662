"""The extension's packaging: CMake lists name every file the module needs and nothing missing,
`esegeta.s4ext` and `Esegeta.json` agree with CMakeLists.txt, the licence is the project's, and a
CMake configure + install (against a stand-in for Slicer's build macros, which copy/install files
the same way) lays the module out so that `EsegetaLib` imports and the worker runs from it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from module_source import (CATALOG, LIBRARY, MODULE, MODULE_CMAKE, NOT_SHIPPED_PACKAGES, REPO,
                           TOP_CMAKE, cmake_list, cmake_variable, lazy_import_closure, library_files_to_ship,
                           s4ext_fields)

MODULE_RESOURCES = ["Resources/Icons/Esegeta.png", "Resources/UI/Esegeta.ui", "Resources/requirements.txt"]
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "build_subdirectory", "enabled", "tier"}  # slicer-extension-catalog-entry-schema v1.0.1
CATEGORIES = {"Segmentation", "Quantification", "Informatics", "Registration", "Filtering", "Examples",
              "Utilities", "Developer Tools", "IGT", "Diffusion", "Shape Analysis", "Wizards"}


def _module_cmake():
    return MODULE_CMAKE.read_text(encoding="utf-8")


def _missing_lines(expected, listed):
    return "\n".join(f"  {item}" for item in sorted(set(expected) - set(listed)))


def test_cmake_lists_every_library_file_that_must_ship():
    text = _module_cmake()
    scripts, data = library_files_to_ship()
    listed_scripts = cmake_list(text, "ESEGETA_LIBRARY_SCRIPTS")
    listed_data = cmake_list(text, "ESEGETA_LIBRARY_RESOURCES")
    fix = " (or run: python Testing/slicer_module/update_cmake_lists.py)"
    missing = sorted(set(scripts) - set(listed_scripts))
    assert missing == [], "add to ESEGETA_LIBRARY_SCRIPTS in Esegeta/CMakeLists.txt" + fix + ":\n" + \
        _missing_lines(scripts, listed_scripts)
    missing = sorted(set(data) - set(listed_data))
    assert missing == [], "add to ESEGETA_LIBRARY_RESOURCES in Esegeta/CMakeLists.txt" + fix + ":\n" + \
        _missing_lines(data, listed_data)
    for item in listed_scripts + listed_data:
        assert (REPO / item).is_file(), f"Esegeta/CMakeLists.txt lists {item}, which does not exist"
    assert cmake_list(text, "ESEGETA_MODULE_RESOURCES") == MODULE_RESOURCES
    assert any(item.endswith("sample_tof.nii.gz") for item in listed_data) or not (
        LIBRARY / "resources" / "sample_tof.nii.gz").exists()


def test_cmake_lists_everything_the_module_can_import():
    """Every EsegetaLib module reachable from Esegeta.py (through any import, the worker's run
    included) is shipped, and none of it lies in a package the extension leaves out."""
    closure = lazy_import_closure(MODULE)
    assert {"EsegetaLib/slicer/worker.py", "EsegetaLib/runner.py", "EsegetaLib/engine.py",
            "EsegetaLib/slicer/scene.py", "EsegetaLib/slicer/slicer_run.py"} <= closure
    listed = set(cmake_list(_module_cmake(), "ESEGETA_LIBRARY_SCRIPTS"))
    needed = {p for p in closure if p.startswith("EsegetaLib/")}
    assert sorted(needed - listed) == []
    assert not [p for p in needed if p.split("/")[1] in NOT_SHIPPED_PACKAGES]


def test_module_cmake_builds_the_module_script_and_registers_its_self_test():
    text = _module_cmake()
    assert cmake_list(text, "MODULE_PYTHON_SCRIPTS") == ["${MODULE_NAME}.py"]
    assert "set(MODULE_NAME Esegeta)" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    shipped_from_module_folder = {p.name for p in (REPO / "Esegeta").iterdir() if p.is_file()}
    assert shipped_from_module_folder == {"Esegeta.py", "CMakeLists.txt"}, (
        "a new file in Esegeta/ must be listed in MODULE_PYTHON_SCRIPTS/RESOURCES")
    resources = {p.relative_to(REPO).as_posix() for p in (REPO / "Resources").rglob("*") if p.is_file()}
    assert resources == set(MODULE_RESOURCES), "a new file in Resources/ must be listed in ESEGETA_MODULE_RESOURCES"


def test_top_level_cmake_metadata():
    text = TOP_CMAKE.read_text(encoding="utf-8")
    assert "project(Esegeta)" in text and "add_subdirectory(Esegeta)" in text
    assert cmake_variable(text, "EXTENSION_DEPENDS") == "PyTorch"
    assert cmake_variable(text, "EXTENSION_CATEGORY") in CATEGORIES
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert cmake_variable(text, variable)
    assert cmake_variable(text, "EXTENSION_ICONURL").endswith("Resources/Icons/Esegeta.png")
    # the icon and screenshots the catalog shows are files of this repository (branch main)
    for url in [cmake_variable(text, "EXTENSION_ICONURL")] + cmake_variable(text, "EXTENSION_SCREENSHOTURLS").split():
        assert "/main/" in url and (REPO / url.split("/main/", 1)[1]).is_file(), url


def test_s4ext_agrees_with_cmake():
    text = TOP_CMAKE.read_text(encoding="utf-8")
    fields = s4ext_fields()
    assert fields["scm"] == "git" and fields["scmurl"] and fields["scmrevision"]
    assert fields["depends"] == cmake_variable(text, "EXTENSION_DEPENDS")
    assert fields["category"] == cmake_variable(text, "EXTENSION_CATEGORY")
    assert fields["homepage"] == cmake_variable(text, "EXTENSION_HOMEPAGE")
    assert fields["iconurl"] == cmake_variable(text, "EXTENSION_ICONURL")
    assert fields["description"] == cmake_variable(text, "EXTENSION_DESCRIPTION")
    assert fields["contributors"] == cmake_variable(text, "EXTENSION_CONTRIBUTORS")
    assert fields["screenshoturls"] == cmake_variable(text, "EXTENSION_SCREENSHOTURLS")
    assert fields["build_subdirectory"] == "."


def test_catalog_entry_is_the_current_form_and_agrees_with_cmake_and_s4ext():
    entry = json.loads(CATALOG.read_text(encoding="utf-8"))
    text = TOP_CMAKE.read_text(encoding="utf-8")
    assert set(entry) <= CATALOG_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-v1.0.")
    assert entry["category"] == cmake_variable(text, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_variable(text, "EXTENSION_DEPENDS").split()
    assert entry["scm_url"] == s4ext_fields()["scmurl"]
    assert entry["scm_revision"] == s4ext_fields()["scmrevision"]
    assert entry.get("scm_type", "git") in ("git", "local") and entry.get("tier", 5) in (1, 3, 5)
    assert CATALOG.name == "Esegeta.json"  # named after project(Esegeta)


def test_license_is_apache_2_as_in_pyproject():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


# ---------------------------------------------------------------- configure + install with CMake
# Slicer's build macros, reduced to what they do with files (Slicer: CMake/
# SlicerMacroBuildScriptedModule.cmake copies SCRIPTS/RESOURCES relative to the module folder into
# <build>/<Slicer_QTSCRIPTEDMODULES_LIB_DIR> and installs them to <Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR>).
STAND_IN_SLICER = textwrap.dedent("""
    set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.8/qt-scripted-modules")
    set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
    set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
    set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
    set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
    set(Slicer_FOUND TRUE)
""")
STAND_IN_USE = textwrap.dedent("""
    foreach(_var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_DESCRIPTION EXTENSION_DEPENDS)
      if(NOT DEFINED ${_var})
        message(FATAL_ERROR "${_var} must be set before find_package(Slicer)")
      endif()
    endforeach()
    macro(slicerMacroBuildScriptedModule)
      cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
      if(MY_UNPARSED_ARGUMENTS)
        message(FATAL_ERROR "unknown arguments: ${MY_UNPARSED_ARGUMENTS}")
      endif()
      foreach(_f ${MY_SCRIPTS} ${MY_RESOURCES})
        if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_f})
          message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${_f}'")
        endif()
        get_filename_component(_d ${_f} DIRECTORY)
        configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${_f} ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${_f} COPYONLY)
        install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/${_f} DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${_d})
      endforeach()
    endmacro()
    macro(slicer_add_python_unittest)
      cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
      file(APPEND ${CMAKE_BINARY_DIR}/python-tests.txt "${MY_SCRIPT}\\n")
    endmacro()
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("cmake")
    stand_in = root / "Slicer"
    stand_in.mkdir()
    (stand_in / "SlicerConfig.cmake").write_text(STAND_IN_SLICER)
    (stand_in / "UseSlicer.cmake").write_text(STAND_IN_USE)
    (stand_in / "Empty.cmake").write_text("")
    build, prefix = root / "build", root / "install"
    configure = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stand_in}",
                                "-DBUILD_TESTING=ON"], capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    install = subprocess.run([cmake, "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    return {"build": build, "modules": prefix / "lib/Slicer-5.8/qt-scripted-modules"}


def test_install_puts_module_library_and_resources_side_by_side(installed):
    modules = installed["modules"]
    assert (modules / "Esegeta.py").is_file()
    assert (modules / "Resources" / "UI" / "Esegeta.ui").is_file()
    assert (modules / "Resources" / "Icons" / "Esegeta.png").is_file()
    assert (modules / "Resources" / "requirements.txt").is_file()
    scripts, data = library_files_to_ship()
    for item in scripts + data:
        assert (modules / item).read_bytes() == (REPO / item).read_bytes(), item
    assert not (modules / "EsegetaLib" / "web").exists()
    # the build tree holds the same layout (a build tree runs the module too)
    build_modules = installed["build"] / "lib/Slicer-5.8/qt-scripted-modules"
    assert (build_modules / "EsegetaLib" / "slicer" / "worker.py").is_file() and (build_modules / "Esegeta.py").is_file()
    assert (installed["build"] / "python-tests.txt").read_text().split() == ["Esegeta.py"]


def test_installed_library_imports_and_finds_its_resources(installed):
    """From the installed folder alone (nothing from the repository on sys.path)."""
    modules = installed["modules"]
    code = textwrap.dedent("""
        import sys, EsegetaLib, EsegetaLib.slicer.worker as w, EsegetaLib.slicer.slicer_logic as L
        assert EsegetaLib.__file__.startswith(sys.argv[1]), EsegetaLib.__file__
        assert w.library_root() == sys.argv[1]
        print(L.load_requirements(sys.argv[1] + "/Resources/requirements.txt")[0])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code, str(modules)], cwd=str(modules), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("captum")
    # the worker entry point starts from the installed copy and answers in its protocol
    job = installed["build"] / "not-a-job.json"
    job.write_text("{}")
    worker = subprocess.run([sys.executable, "-m", "EsegetaLib.slicer.worker", str(job)], cwd=str(modules), env=env,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2, worker.stderr
    events = [json.loads(line.split(" ", 1)[1]) for line in worker.stdout.splitlines() if line.startswith("@esegeta ")]
    assert [e["event"] for e in events] == ["started", "error"]
    assert events[1]["kind"] == "user" and "is not an Esegeta job" in events[1]["message"]
    assert str(modules / "EsegetaLib" / "slicer" / "worker.py") in events[1]["details"]


def _path_functions(module_file: Path):
    """`_libraryFolder` and `resourcePath` from Esegeta.py, run as if that file were `module_file`
    (Esegeta.py itself needs the Slicer application to import)."""
    import ast

    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("_libraryFolder", "resourcePath")]
    namespace = {"os": os, "__file__": str(module_file)}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(MODULE), "exec"), namespace)
    return namespace["_libraryFolder"], namespace["resourcePath"]


def test_module_finds_library_and_resources_from_source_and_when_installed(installed):
    for module_file, root in ((MODULE, REPO), (installed["modules"] / "Esegeta.py", installed["modules"])):
        library_folder, resource_path = _path_functions(module_file)
        assert Path(library_folder()) == root
        assert Path(resource_path("UI/Esegeta.ui")) == root / "Resources" / "UI" / "Esegeta.ui"
        assert Path(resource_path("requirements.txt")).is_file()


def test_catalog_metadata_check_flags_placeholders_and_passes_real_entries():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_catalog", REPO / "scripts" / "check_catalog.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    real = ('set(EXTENSION_CONTRIBUTORS "Jane Roe (Lab A, Uni B), John Doe (Corp)")\n'
            'set(EXTENSION_HOMEPAGE "https://github.com/someone/SlicerEsegeta#readme")\n'
            'set(EXTENSION_ICONURL "https://raw.githubusercontent.com/someone/SlicerEsegeta/main/i.png")\n'
            'set(EXTENSION_SCREENSHOTURLS "https://raw.githubusercontent.com/someone/SlicerEsegeta/main/s.png")\n')
    assert check.problems(real) == []
    assert check.split_contributors("Jane Roe (Lab A, Uni B), John Doe (Corp)") == ["Jane Roe (Lab A, Uni B)",
                                                                                   "John Doe (Corp)"]
    current = check.problems(TOP_CMAKE.read_text(encoding="utf-8"))
    text = TOP_CMAKE.read_text(encoding="utf-8")
    if "Esegeta developers" in text:  # still the placeholder: it must be flagged
        assert any("'Esegeta developers' is not 'Firstname Lastname (Organization)'" in p for p in current)
    if "github.com/esegeta/Esegeta" in text:
        assert any("EXTENSION_ICONURL" in p for p in current)
    # the module shows the same contributors as the catalog
    module = (REPO / "Esegeta" / "Esegeta.py").read_text(encoding="utf-8")
    contributors = ast_literal(module, "CONTRIBUTORS")
    assert contributors == check.split_contributors(cmake_variable(text, "EXTENSION_CONTRIBUTORS"))
    assert "scripts/check_catalog.py" in (REPO / "README.md").read_text(encoding="utf-8")


def ast_literal(source: str, name: str):
    import ast

    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found")
