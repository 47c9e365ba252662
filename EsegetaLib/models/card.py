"""Model cards (`.json`): a MONAI network class with its arguments plus a state dict loaded with
`torch.load(weights_only=True)`, or a TorchScript/`.pt2` file, together with what the model expects
(channels, class names, activation, normalisation, patch size, spacing). See `base.ModelCard`.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from ..errors import EsegetaError
from .base import DEFAULT_CARD, LoadedModel, ModelCard, infer_in_channels, load_tensors
from .torchscript import load_archive


def load(path: str) -> LoadedModel:
    """A model card and the network it describes."""
    card = ModelCard.read(path)
    network = _network_from_card(card, os.path.dirname(os.path.abspath(path)), path)
    return LoadedModel(card=card, network=network, path=path, format="card")


def load_default_model() -> LoadedModel:
    """The bundled vessel UNet trained on synthetic TOF-MRA (`scripts/train_default_model.py`)."""
    from ..sample import resource_path

    path = resource_path(DEFAULT_CARD)
    if not path.is_file():
        raise EsegetaError(f"the bundled model card {path} is missing: reinstall esegeta or run "
                           "scripts/train_default_model.py")
    from . import load_model

    return load_model(str(path))


def build_network(card: ModelCard):
    """Instantiate the MONAI network the card names, with its arguments (no weights)."""
    try:
        from monai.networks import nets
    except ImportError as exc:
        raise EsegetaError(f"model card '{card.name}' names a MONAI network: pip install monai") from exc
    cls = getattr(nets, card.architecture, None)
    if cls is None or not isinstance(cls, type):
        raise EsegetaError(f"model card '{card.name}': '{card.architecture}' is not a network in "
                           "monai.networks.nets (e.g. UNet, DynUNet, SegResNet, SwinUNETR)")
    try:
        return cls(**card.arguments)
    except TypeError as exc:
        raise EsegetaError(f"model card '{card.name}': bad arguments for {card.architecture}: "
                           f"{exc}") from exc


def _network_from_card(card: ModelCard, folder: str, card_path: str):
    if card.architecture in ("torchscript", "export"):
        if not card.weights:
            raise EsegetaError(f"{card_path}: 'weights' must name the {card.architecture} file")
        network = load_archive(os.path.join(folder, card.weights))
    else:
        network = build_network(card)
        if card.weights:
            state = load_state_dict(os.path.join(folder, card.weights))
            mismatch = state_mismatch(network, state)
            if mismatch:
                arguments = ", ".join(f"{k}={v!r}" for k, v in card.arguments.items())
                raise EsegetaError(f"{card_path}: the weights do not fit {card.architecture}({arguments}): {mismatch}; "
                                   "check the card's network arguments (channels, strides, features) against the "
                                   "network the weights were trained with")
            network.load_state_dict(state)
    if card.in_channels is None:
        card.in_channels = infer_in_channels(network)
    return network


def state_mismatch(network, state: Dict[str, Any], shown: int = 3) -> str:
    """How a state dict differs from the network's own (one line: parameters whose shape differs, with
    both shapes, then missing and unexpected names, the first `shown` of each); "" when it fits."""
    own = network.state_dict()
    shapes = [f"{k} {tuple(state[k].shape)} in the weights vs {tuple(v.shape)} in the network"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    for label, names in (("shape differs for", shapes), ("missing", missing), ("unexpected", unexpected)):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{len(names)} {label}: {', '.join(names[:shown])}{more}"
                         if label != "shape differs for" else
                         f"{len(names)} parameter(s) differ in shape: {'; '.join(names[:shown])}{more}")
    return "; ".join(parts)


def load_state_dict(path) -> Dict[str, Any]:
    """Tensors only (`weights_only=True`); unwraps {"state_dict": ...} and DataParallel prefixes."""
    if not os.path.exists(path):
        raise EsegetaError(f"weights file not found: {path}")
    state = load_tensors(path, "a PyTorch weights file")
    for key in ("state_dict", "model_state_dict", "model", "network_weights"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EsegetaError(f"{path} does not hold a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


