"""Rewrite ESEGETA_LIBRARY_SCRIPTS / ESEGETA_LIBRARY_RESOURCES in Esegeta/CMakeLists.txt from the
files now in EsegetaLib (what test_packaging.py expects).  Run after adding a file to EsegetaLib:

    python Testing/slicer_module/update_cmake_lists.py
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from module_source import MODULE_CMAKE, library_files_to_ship  # noqa: E402


def main() -> None:
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    scripts, data = library_files_to_ship()
    for variable, items in (("ESEGETA_LIBRARY_SCRIPTS", scripts), ("ESEGETA_LIBRARY_RESOURCES", data)):
        block = f"set({variable}\n" + "".join(f"  {item}\n" for item in items) + "  )"
        text, count = re.subn(r"set\(" + variable + r"\s.*?\)", lambda _: block, text, count=1, flags=re.S)
        if count != 1:
            raise SystemExit(f"set({variable} ...) not found in {MODULE_CMAKE}")
    MODULE_CMAKE.write_text(text, encoding="utf-8")
    print(f"{MODULE_CMAKE}: {len(scripts)} scripts, {len(data)} data files")


if __name__ == "__main__":
    main()
