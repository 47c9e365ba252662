"""Read and write medical volumes with exact geometry: NIfTI, NRRD and MetaImage.

Inside the engine every volume is `(C, I, J, K)` float32 with a 4x4 IJK->RAS affine in millimetres.
Every reader builds that affine exactly as ITK builds the image's origin, spacing and direction (ITK
is what 3D Slicer reads volumes with): `nifti.py` follows ITK's qform/sform rule, `nrrd.py` ITK's
`space` handling, `metaimage.py` reads through SimpleITK. A header ITK refuses, or reads in a way a
Slicer volume cannot show (sheared axes, zero voxel size, NaN, a 2-D image), is refused with one
line naming the field (`EsegetaError`). Writers put an output on the reference image's grid, voxel
for voxel; a NIfTI output copies the input's header (qform and sform with their codes, units, pixdim)
so that any reader, whichever form it prefers, reads input and outputs on the same grid. Files
appear whole or not at all: each writer writes into a temporary name in the destination folder and
then renames (`os.replace`, atomic on one file system).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from ..errors import EsegetaError
from . import metaimage, nifti, nrrd
from .geometry import LPS_TO_RAS

# Extension -> format family. Longest suffixes first so ".nii.gz" wins over ".gz".
_EXTENSIONS = ((".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"), (".nhdr", "nrrd"),
               (".mha", "metaimage"), (".mhd", "metaimage"))
_OUTPUT_EXTENSION = {"nifti": ".nii.gz", "nrrd": ".nrrd", "metaimage": ".mha"}
_READERS = {"nifti": nifti.read, "nrrd": nrrd.read, "metaimage": metaimage.read}


@dataclass
class Image:
    """A volume `(C, I, J, K)` float32 with its IJK->RAS affine (mm) and where it came from."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    format: str = "nifti"
    path: Optional[str] = None
    # The file's own header (nibabel's for NIfTI, pynrrd's dict for NRRD), kept so that outputs can
    # carry the input's fields; None for images built in memory.
    header: Any = None

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size along I, J, K in mm (column norms of the affine, valid for oblique grids)."""
        return tuple(float(v) for v in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    @property
    def spatial_shape(self) -> Tuple[int, int, int]:
        return tuple(int(v) for v in self.array.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])


def format_of(path) -> str:
    """The format family named by a path's extension, or a one-line error."""
    name = str(path).lower()
    for ext, fmt in _EXTENSIONS:
        if name.endswith(ext):
            return fmt
    known = ", ".join(ext for ext, _ in _EXTENSIONS)
    raise EsegetaError(f"{path}: unknown image extension; use one of {known}")


def extension_for(image: Image) -> str:
    """Output extension in the input's format family (NIfTI in -> .nii.gz, NRRD -> .nrrd, MetaImage -> .mha)."""
    return _OUTPUT_EXTENSION[image.format]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------- reading
def read_image(path) -> Image:
    """Read a NIfTI/NRRD/MetaImage volume as `(C, I, J, K)` float32 + IJK->RAS affine, as ITK reads it."""
    path = str(path)
    if not os.path.exists(path):
        raise EsegetaError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise EsegetaError(f"{path} is a folder, not an image file (DICOM folders are not supported: "
                           "convert to NIfTI or NRRD first)")
    fmt = format_of(path)
    try:
        array, affine, header = _READERS[fmt](path)
    except EsegetaError as exc:
        if path in str(exc):
            raise
        raise EsegetaError(f"{path}: {exc}") from exc
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # every library has its own exception types for a broken file
        raise EsegetaError(f"cannot read {path} as {fmt}: {_itk_reason(exc)}") from exc
    if array.ndim != 4 or min(array.shape[1:]) < 1:
        raise EsegetaError(f"{path} is not a 3D volume (array shape {array.shape[1:]})")
    return Image(array=np.ascontiguousarray(array, dtype=np.float32), ijk_to_ras=np.asarray(affine, np.float64),
                 format=fmt, path=path, header=header)


def _itk_reason(exc: BaseException) -> str:
    """ITK's messages start with a source location; the reason is on a later line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR" in line or "Refusing" in line:
            return line.split("):", 1)[-1].strip()[:200]
    return lines[0][:200] if lines else type(exc).__name__


# ----------------------------------------------------------------------------------------- writing
def write_image(path, array: np.ndarray, reference: Image, dtype=None, compress: bool = True) -> str:
    """Write `array` (I,J,K) or (C,I,J,K) on `reference`'s grid, in the format of `path`'s extension.

    A NIfTI written from a NIfTI reference keeps the reference's header fields (both forms, codes,
    units); an NRRD written from an NRRD reference is in the reference's space (RAS, LAS or LPS);
    every other combination writes `reference.ijk_to_ras` (NRRD in LPS). `dtype=None` keeps the array's
    type (float64 becomes float32, bool becomes uint8). Returns the path. The file appears whole or
    not at all. `compress=False` writes NRRD raw (exchange files between processes: gzip level 9
    costs ~13 s per 100 MB for a file read back once); NIfTI compression follows the extension.
    """
    path = str(path)
    fmt = format_of(path)
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(reference.spatial_shape):
        raise EsegetaError(f"cannot write {path}: array shape {array.shape} is not on the reference "
                           f"grid {reference.spatial_shape}")
    if dtype is None:
        dtype = {np.dtype(np.float64): np.float32, np.dtype(bool): np.uint8}.get(array.dtype, array.dtype)
    array = _cast(array, np.dtype(dtype), path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise EsegetaError(f"cannot write {path}: folder {folder} does not exist")
    affine = np.asarray(reference.ijk_to_ras, float)
    if fmt == "nifti":
        carried = nifti.carried_header(reference.header if reference.format == "nifti" else None, affine)
        writer = lambda target: nifti.write(target, array, affine, carried)  # noqa: E731
    elif fmt == "nrrd":
        # in the input's space (RAS/LAS/LPS) when the input is an NRRD, else LPS
        space = nrrd.output_space(reference.header if reference.format == "nrrd" else None)
        writer = lambda target: nrrd.write(target, array, affine, compress=compress, space=space)  # noqa: E731
    else:
        writer = lambda target: metaimage.write(target, array, affine)  # noqa: E731
    # Detached formats (.nhdr, .mhd) write two files: build both in a private temporary folder
    # under their final names, then move the data file and, last, the header into place.
    tmpdir = tempfile.mkdtemp(prefix=".esegeta-", dir=folder)
    try:
        writer(os.path.join(tmpdir, os.path.basename(path)))
        names = sorted(os.listdir(tmpdir), key=lambda n: n == os.path.basename(path))
        for name in names:
            os.replace(os.path.join(tmpdir, name), os.path.join(folder, name))
    except EsegetaError:
        raise
    except OSError as exc:
        raise EsegetaError(f"cannot write {path}: {_first_line(exc)}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _cast(array: np.ndarray, dtype: np.dtype, path: str) -> np.ndarray:
    """Cast for writing; integer targets round, and values out of range are an error, not a wrap."""
    if dtype.kind in "iu" and array.dtype.kind not in "iub" or (
            dtype.kind in "iu" and array.dtype.kind in "iu" and not np.can_cast(array.dtype, dtype)):
        info = np.iinfo(dtype)
        if array.size and (np.nanmin(array) < info.min or np.nanmax(array) > info.max
                           or not np.all(np.isfinite(array))):
            raise EsegetaError(f"cannot write {path} as {dtype}: values {np.nanmin(array):g}.."
                               f"{np.nanmax(array):g} do not fit; choose a wider type")
        if array.dtype.kind == "f":
            array = np.rint(array)
    return np.ascontiguousarray(array, dtype=dtype)


__all__ = ["Image", "LPS_TO_RAS", "extension_for", "format_of", "read_image", "write_image"]
