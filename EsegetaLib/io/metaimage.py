"""MetaImage (.mha/.mhd) through SimpleITK, i.e. exactly as ITK and Slicer read it.

ITK takes the geometry from `Offset`, `ElementSpacing` and `TransformMatrix` (LPS) and ignores
`AnatomicalOrientation` for placing voxels (checked in Testing/io); Esegeta does the same by reading
through ITK itself, and refuses what Slicer cannot show (a sheared `TransformMatrix`).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import EsegetaError
from .geometry import LPS_TO_RAS, affine_from, check_grid, check_spacing


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise EsegetaError("MetaImage (.mha/.mhd) needs SimpleITK: pip install SimpleITK, or use .nii.gz / .nrrd") \
            from exc
    return sitk


def read(path) -> Tuple[np.ndarray, np.ndarray, None]:
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise EsegetaError(f"{path} is a {reader.GetDimension()}-D image (MetaImage NDims); Esegeta explains 3-D "
                           "volumes: give the whole 3-D scan (not one slice), e.g. exported from Slicer as NIfTI")
    check_spacing(reader.GetSpacing(), "MetaImage ElementSpacing")
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = LPS_TO_RAS @ affine_from(direction, reader.GetSpacing(), reader.GetOrigin())
    check_grid(affine, "MetaImage TransformMatrix")
    img = reader.Execute()
    data = sitk.GetArrayViewFromImage(img)  # (K, J, I) or (K, J, I, C)
    data = np.array(data.transpose((2, 1, 0) + ((3,) if data.ndim == 4 else ())))
    array = data[None] if data.ndim == 3 else np.moveaxis(data, 3, 0)
    return array, affine, None


def write(path, array: np.ndarray, affine: np.ndarray) -> None:
    sitk = _sitk()
    lps = np.linalg.inv(LPS_TO_RAS) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    if array.shape[0] == 1:
        img = sitk.GetImageFromArray(array[0].transpose(2, 1, 0))
    else:
        img = sitk.GetImageFromArray(array.transpose(3, 2, 1, 0), isVector=True)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    sitk.WriteImage(img, path, True)
