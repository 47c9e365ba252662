"""Load segmentation models as users have them, behind one `load_model(path, ...)`.

One module per format, each returning a `LoadedModel` whose `description` says what was loaded
(format, classes, activation, spacing, patch, normalisation, preprocessing):
- `torchscript.py`: TorchScript files (`.pt`, `.pth`, `.ts`);
- `export.py`: `torch.export` programs (`.pt2`);
- `card.py`: Esegeta model cards (`.json`);
- `nnunet.py`: nnU-Net v2 trained-model folders (`plans.json`, `dataset.json`, `fold_N/`);
- `bundle.py`: MONAI bundles (a folder or zip with `configs/inference.json|yaml`).
Nothing is unpickled beyond tensors (and, for nnU-Net checkpoints, the few plain types they hold):
a pickled whole model is refused because unpickling runs arbitrary code.
"""
from __future__ import annotations

from typing import Optional, Union

from ..errors import EsegetaError
from ..model_formats import model_format
from .base import (ACTIVATIONS, DEFAULT_CARD, NORMALIZATIONS, IntensityNormalization, LoadedModel,
                   ModelCard, ModelDescription, NormalizedNetwork, make_normalization)
from .card import build_network, load_default_model, load_state_dict

__all__ = ["ACTIVATIONS", "DEFAULT_CARD", "NORMALIZATIONS", "IntensityNormalization", "LoadedModel",
           "ModelCard", "ModelDescription", "NormalizedNetwork", "build_network", "load_default_model",
           "load_model", "load_state_dict", "make_normalization", "model_format"]


def load_model(path, normalization=None, fold: Optional[Union[int, str]] = None,
               activation: Optional[str] = None, checkpoint: Optional[str] = None,
               mirroring: bool = False) -> LoadedModel:
    """Load any supported model (see the module docstring) and settle its activation.

    normalization: overrides the card's (or sets one for a bare TorchScript/export file, default
      "none"); not for nnU-Net/bundles, whose own preprocessing is reproduced.
    fold: nnU-Net only: a fold number or "all" (the fold_all model); None = every fold_N found,
      ensembled (mean of the folds' logits, as nnU-Net does). checkpoint: nnU-Net checkpoint name
      (default checkpoint_final.pth, else checkpoint_best.pth).
      mirroring: nnU-Net only: test-time mirroring over the axes its checkpoint allows (the mean of
      the flipped predictions, as `nnUNetPredictor(use_mirroring=True)`, its default); off by default
      (up to 8x the cost).
    activation: "softmax" | "sigmoid" overrides the card/format; None keeps it, except that a model
      with one output channel is a sigmoid model (detected with a small forward pass).
    Errors: EsegetaError with one line for every expected mistake.
    """
    kind = model_format(path)
    path = str(path)
    if fold is not None and kind != "nnunet":
        raise EsegetaError(f"--fold applies to nnU-Net trained-model folders only; {path} is a {kind} model")
    if mirroring and kind != "nnunet":
        raise EsegetaError(f"--mirroring applies to nnU-Net trained-model folders only; {path} is a {kind} model")
    if kind == "nnunet":
        from . import nnunet

        loaded = nnunet.load(path, fold=fold, checkpoint=checkpoint)
        loaded.use_mirroring = bool(mirroring)
    elif kind == "monai_bundle":
        from . import bundle

        loaded = bundle.load(path)
    elif kind == "card":
        from . import card

        loaded = card.load(path)
    else:
        from . import torchscript

        loaded = torchscript.load(path)
    if normalization is not None:
        if kind in ("nnunet", "monai_bundle"):
            raise EsegetaError(f"a normalisation override does not apply to {kind} models: their own "
                               "preprocessing is reproduced")
        from .base import _normalization_spec

        loaded.card.normalization = _normalization_spec(normalization, "normalization")
    from .base import _set_mode

    _set_mode(loaded.network, False)
    loaded.set_activation(activation)
    return loaded
