"""Read and write medical volumes with exact geometry: NIfTI, NRRD and MetaImage.

Inside the engine every volume is `(C, I, J, K)` float32 with a 4x4 IJK->RAS affine in millimetres
(nibabel's convention). NRRD may be stored in LPS or RAS space and ITK (MetaImage) is always LPS, so
readers and writers convert with diag(-1, -1, 1) on the world side; nothing else in Esegeta deals with
LPS. Writers put a map on the reference image's grid, voxel for voxel, so an attribution overlays
its source in Slicer or any viewer. Files appear whole or not at all: each writer writes into a
temporary name in the destination folder and then renames (`os.replace`, atomic on one file system).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .errors import EsegetaError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Extension -> format family. Longest suffixes first so ".nii.gz" wins over ".gz".
_EXTENSIONS = ((".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"), (".nhdr", "nrrd"),
               (".mha", "metaimage"), (".mhd", "metaimage"))
_OUTPUT_EXTENSION = {"nifti": ".nii.gz", "nrrd": ".nrrd", "metaimage": ".mha"}
_NRRD_SPACES = {"left-posterior-superior": "LPS", "lps": "LPS", "right-anterior-superior": "RAS",
                "ras": "RAS", "scanner-xyz": "RAS", "3d-right-handed": "RAS"}


@dataclass
class Image:
    """A volume `(C, I, J, K)` float32 with its IJK->RAS affine (mm) and where it came from."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    format: str = "nifti"
    path: Optional[str] = None

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
    """Read a NIfTI/NRRD/MetaImage volume as `(C, I, J, K)` float32 + IJK->RAS affine."""
    path = str(path)
    if not os.path.exists(path):
        raise EsegetaError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise EsegetaError(f"{path} is a folder, not an image file (DICOM folders are not supported: "
                           "convert to NIfTI or NRRD first)")
    fmt = format_of(path)
    reader = {"nifti": _read_nifti, "nrrd": _read_nrrd, "metaimage": _read_metaimage}[fmt]
    try:
        array, affine = reader(path)
    except EsegetaError as exc:
        if path in str(exc):
            raise
        raise EsegetaError(f"{path}: {exc}") from exc
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # every library has its own exception types for a broken file
        raise EsegetaError(f"cannot read {path} as {fmt}: {_first_line(exc)}") from exc
    if array.ndim != 4 or min(array.shape[1:]) < 1:
        raise EsegetaError(f"{path} is not a 3D volume (array shape {array.shape[1:]})")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise EsegetaError(f"{path} has a degenerate orientation matrix; fix its header")
    return Image(array=np.ascontiguousarray(array, dtype=np.float32), ijk_to_ras=affine.astype(np.float64),
                 format=fmt, path=path)


def _as_cijk(data: np.ndarray, channel_axis: Optional[int]) -> np.ndarray:
    if data.ndim == 3:
        return data[None]
    if channel_axis is None:
        raise EsegetaError(f"expected a 3D volume, got {data.ndim} dimensions")
    return np.moveaxis(data, channel_axis, 0)


def _read_nifti(path):
    import nibabel as nib

    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise EsegetaError(f"{path} is not a NIfTI image")
    data = np.asanyarray(img.dataobj)  # applies scl_slope/inter
    # NIfTI stores vectors/time on dims 4 and 5 (I, J, K, T, C): keep only non-singleton ones.
    while data.ndim > 4 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim > 4:
        raise EsegetaError(f"{path} has {data.ndim} dimensions; expected a 3D volume or 3D + channels")
    return _as_cijk(data, 3 if data.ndim == 4 else None), np.asarray(img.affine, dtype=np.float64)


def _read_nrrd(path):
    import nrrd

    data, header = nrrd.read(path)  # index order F: axes as the file lists them (fastest first)
    if data.ndim not in (3, 4):
        raise EsegetaError(f"{path} has {data.ndim} dimensions; expected a 3D volume or 3D + channels")
    space = str(header.get("space", "")).lower()
    if space and space not in _NRRD_SPACES:
        raise EsegetaError(f"{path}: NRRD space '{space}' is not supported (use LPS or RAS)")
    directions = header.get("space directions")
    if directions is None:
        # No world frame: spacings (default 1) along axis-aligned directions.
        spacings = header.get("spacings", [1.0] * data.ndim)
        domain = [a for a, s in enumerate(spacings) if np.isfinite(s)] if data.ndim > 3 else [0, 1, 2]
        rows = [np.eye(3)[i] * spacings[a] for i, a in enumerate(domain)]
    else:
        directions = np.asarray(directions, dtype=np.float64)
        domain = [a for a in range(data.ndim) if np.all(np.isfinite(directions[a]))]
        rows = [directions[a] for a in domain]
    if len(domain) != 3:
        raise EsegetaError(f"{path} has {len(domain)} spatial axes; expected 3")
    channel_axes = [a for a in range(data.ndim) if a not in domain]
    if len(channel_axes) > 1:
        raise EsegetaError(f"{path} has more than one non-spatial axis; expected 3D + channels")
    array = _as_cijk(data, channel_axes[0] if channel_axes else None)
    affine = np.eye(4)
    affine[:3, :3] = np.stack(rows, axis=1)  # columns = world step of one voxel along I, J, K
    origin = header.get("space origin")
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    if _NRRD_SPACES.get(space, "RAS") == "LPS":
        affine = LPS_TO_RAS @ affine
    return array, affine


def _read_metaimage(path):
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise EsegetaError("reading MetaImage (.mha/.mhd) needs SimpleITK: pip install SimpleITK") from exc
    img = sitk.ReadImage(path)
    if img.GetDimension() != 3:
        raise EsegetaError(f"{path} has {img.GetDimension()} dimensions; expected a 3D volume")
    data = sitk.GetArrayViewFromImage(img)  # (K, J, I) or (K, J, I, C)
    data = np.array(data.transpose((2, 1, 0) + ((3,) if data.ndim == 4 else ())))
    affine_lps = np.eye(4)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps[:3, :3] = direction @ np.diag(img.GetSpacing())
    affine_lps[:3, 3] = img.GetOrigin()
    return _as_cijk(data, 3 if data.ndim == 4 else None), LPS_TO_RAS @ affine_lps


# ----------------------------------------------------------------------------------------- writing
def write_image(path, array: np.ndarray, reference: Image, dtype=None) -> str:
    """Write `array` (I,J,K) or (C,I,J,K) on `reference`'s grid, in the format of `path`'s extension.

    `dtype=None` keeps the array's type (float64 becomes float32, bool becomes uint8). Returns the
    path. The file appears whole or not at all.
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
    writer = {"nifti": _write_nifti, "nrrd": _write_nrrd, "metaimage": _write_metaimage}[fmt]
    # Detached formats (.nhdr, .mhd) write two files: build both in a private temporary folder
    # under their final names, then move the data file and, last, the header into place.
    tmpdir = tempfile.mkdtemp(prefix=".esegeta-", dir=folder)
    try:
        writer(os.path.join(tmpdir, os.path.basename(path)), array, np.asarray(reference.ijk_to_ras, float))
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


def _write_nifti(path, array, affine):
    import nibabel as nib

    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, 3)
    img = nib.Nifti1Image(data, affine)
    # Both forms, scanner frame: viewers that only read the qform (rigid + qfac) and those that
    # prefer the sform (any affine) agree for every rigid-plus-scaling grid.
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if array.shape[0] > 1:
        img.header.set_intent("vector")
    nib.save(img, path)


def _write_nrrd(path, array, affine):
    import nrrd

    lps = (np.linalg.inv(LPS_TO_RAS) @ affine)
    channels = array.shape[0]
    header = {
        "space": "left-posterior-superior",  # Slicer's own convention
        "space origin": lps[:3, 3],
        "encoding": "gzip",
    }
    if channels == 1:
        data = array[0]
        header["space directions"] = lps[:3, :3].T  # one row per axis
        header["kinds"] = ["domain"] * 3
    else:
        data = array  # channel first = fastest axis, as Slicer stores vector volumes
        header["space directions"] = np.vstack([np.full(3, np.nan), lps[:3, :3].T])
        header["kinds"] = ["vector"] + ["domain"] * 3
    nrrd.write(path, data, header, detached_header=path.lower().endswith(".nhdr"), index_order="F")


def _write_metaimage(path, array, affine):
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise EsegetaError("writing MetaImage (.mha/.mhd) needs SimpleITK: pip install SimpleITK, "
                           "or write .nii.gz / .nrrd") from exc
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
