"""Check the Extensions Index metadata before submitting: prints what is still a placeholder.

    python scripts/check_catalog.py      # exit 1 while something must be filled in

One place holds the metadata: the EXTENSION_* variables of the top-level CMakeLists.txt (the Index
reads them there). esegeta.s4ext, Esegeta.json and Esegeta/Esegeta.py (CONTRIBUTORS) repeat parts
of it and are checked against it by Testing/slicer_module/test_packaging.py.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
# The repository named before it was published: every URL must point at the public repository.
PLACEHOLDER_REPOSITORIES = ("github.com/esegeta/Esegeta", "raw.githubusercontent.com/esegeta/Esegeta")
# "Firstname Lastname (Organization)", as the Index's template and reviewers expect.
CONTRIBUTOR = re.compile(r"^[A-Z][\w.'-]*(?: [A-Z][\w.'-]*)+ \([^()]+\)$")


def cmake_fields(text: str) -> Dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text)}


def split_contributors(text: str) -> List[str]:
    """'A B (X), C D (Y, Z)' -> ['A B (X)', 'C D (Y, Z)'] (commas inside parentheses kept)."""
    return [part.strip() for part in re.split(r",\s*(?![^()]*\))", text) if part.strip()]


def problems(cmake_text: str) -> List[str]:
    """What must be filled in before submitting, one line each (empty: ready)."""
    fields = cmake_fields(cmake_text)
    found = []
    for name in split_contributors(fields.get("EXTENSION_CONTRIBUTORS", "")) or ["(none)"]:
        if not CONTRIBUTOR.match(name):
            found.append(f"EXTENSION_CONTRIBUTORS: '{name}' is not 'Firstname Lastname (Organization)'")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in fields.get(key, "").split() or ["(none)"]:
            if any(p in url for p in PLACEHOLDER_REPOSITORIES) or not url.startswith("https://"):
                found.append(f"{key}: {url} is not the public repository's URL")
    return found


def main() -> int:
    found = problems((REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    for line in found:
        print(line)
    if found:
        print("Fill these in CMakeLists.txt (then esegeta.s4ext, Esegeta.json and CONTRIBUTORS in "
              "Esegeta/Esegeta.py, which the tests keep in step) before submitting to the Extensions Index.")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
