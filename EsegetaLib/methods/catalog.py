"""Registers every method (imported by `base._ensure_loaded`).  See docs/readme/methods.md."""
from __future__ import annotations

from .base import _REGISTRY, register
from . import cam, excitation, featurevis, gradient, layer_methods, lrp, noise, perturbation, rise, scorecam, topwindows

ORDER = (gradient.SPECS + noise.SPECS + cam.SPECS + layer_methods.SPECS + perturbation.SPECS + rise.SPECS
         + scorecam.SPECS + excitation.SPECS + lrp.SPECS + featurevis.SPECS + topwindows.SPECS)

# Layer methods hook modules: they need an eager network.  Guided backprop, deconvolution and
# DeepLift apply their rules at the dispatcher (methods/guided.py, methods/rescale.py): any format.
# LRP hooks its rule layers (methods/lrp_rules.py): eager too.
for _spec in ORDER:
    _spec.requires_eager = _spec.needs_layer or _spec.name == "LRP"
    if _spec.name not in _REGISTRY:
        register(_spec)
