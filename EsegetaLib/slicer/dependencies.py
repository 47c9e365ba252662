"""Installing what the worker needs into desktop Slicer's Python, on the first Apply.

The decisions (what is missing, the one confirmation, the constraints that protect every package
Slicer already has, the platform and version checks) are `slicer_logic`'s, tested without Slicer;
this module only calls Slicer's installers: PyTorch through the PyTorch extension (it picks the
CUDA or CPU build), the rest through `slicer.packaging.pip_ensure` (Slicer >= 5.11) or
`slicer.util.pip_install`. `slicer` is imported inside the functions: nothing here runs at import.
"""
from __future__ import annotations

import logging
import os
import platform
import tempfile
from typing import Callable, Sequence

from ..errors import EsegetaError
from . import slicer_logic


def check_platform(slicer_version: str) -> None:
    """Refuse, in one line, a Slicer or a computer Esegeta cannot run on (before installing anything)."""
    problem = (slicer_logic.slicer_version_problem(slicer_version)
               or slicer_logic.platform_problem(platform.system(), platform.machine(),
                                                slicer_logic.installed_version("numpy")))
    if problem:
        raise EsegetaError(problem)


def ensure(requirements: Sequence[str], confirm: Callable[[str], bool], report: Callable[[str], None] = logging.info,
           slicer_version: str = "") -> bool:
    """Install what is missing after one confirmation (`confirm(text)`) listing it all; False if the
    user declined. `report` receives each step (the panel's log and Slicer's)."""
    if slicer_version:
        check_platform(slicer_version)
    plan = slicer_logic.dependency_plan(requirements)
    if plan.nothing_to_do:
        return True
    if not confirm(plan.confirmation()):
        return False
    if plan.torch_needed:
        report("Installing PyTorch through the PyTorch extension (this can take several minutes)...")
        install_torch(plan.torch_requirement)
    if plan.pip_missing:
        report("Installing " + ", ".join(plan.pip_missing) + " ...")
        install_packages(plan.pip_missing)
    remaining = slicer_logic.dependency_plan(requirements)
    if not remaining.nothing_to_do:
        raise EsegetaError("Some packages are still missing after installing ("
                           + ", ".join(remaining.pip_missing + (["torch"] if remaining.torch_needed else []))
                           + "); restart Slicer and press Apply again.")
    report("All packages are installed.")
    return True


def install_torch(requirement: str) -> None:
    """PyTorch through the PyTorch extension, which picks the CUDA/CPU build for this computer."""
    try:
        import PyTorchUtils
    except ImportError:
        raise EsegetaError("Esegeta needs the PyTorch extension: install 'PyTorch' from the Extensions Manager "
                           "and restart Slicer.") from None
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement) is None:
        raise EsegetaError("PyTorch could not be installed; use the 'PyTorch Util' module to install it, "
                           "then press Apply again.")


def pip_ensure():
    """`slicer.packaging.pip_ensure` (named `slicer.pydeps.pip_ensure` in some 5.11 previews), or None."""
    import importlib

    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module.pip_ensure
    return None


def install_packages(requirements: Sequence[str]) -> None:
    """Everything else with pip, every distribution Slicer already has pinned by a constraints file."""
    with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as handle:
        handle.write(slicer_logic.protection_constraints(requirements))
        constraints = handle.name
    try:
        ensure_with_pip = pip_ensure()
        if ensure_with_pip is not None:  # Slicer >= 5.11: checks, installs, shows progress, offers a restart
            ensure_with_pip(list(requirements), constraints=constraints, prompt_install=False, requester="Esegeta")
        else:
            import slicer

            slicer.util.pip_install(list(requirements) + ["-c", constraints])
    finally:
        os.remove(constraints)
