"""Esegeta: explain 3D medical image segmentation models.

The engine is importable without 3D Slicer. Heavy modules (torch, captum) load on first use of
`explain`, so `import EsegetaLib` stays cheap for the Slicer module's panel.
"""
__version__ = "0.1.0"


def explain(*args, **kwargs):
    """See `EsegetaLib.api.explain`."""
    from .api import explain as _explain

    return _explain(*args, **kwargs)
