"""NIfTI read the way ITK (and therefore 3D Slicer) reads it, and written with the input's header.

A NIfTI header can hold two voxel->world transforms, the qform (rotation + scaling + qfac) and the
sform (any affine), each with a code. Readers disagree about which one counts: nibabel takes the
sform whenever its code is set; ITK >= 5.4 (`Modules/IO/NIFTI/src/itkNiftiImageIO.cxx`,
`SetImageIOOrientationFromNIfTI`) takes the sform only when it is a rotation + scaling and
- the qform code is 0, or the sform code is 1 (scanner anatomical), or
- sform and qform describe the same grid;
otherwise the qform; the spacing always comes from pixdim (scaled by `xyzt_units`), not from the
matrix, and the origin is the chosen matrix's translation (also scaled). With both codes 0 ITK puts
the origin at 0 with an identity LPS direction. `itk_affine` below follows that rule in Python
(SimpleITK is optional for Esegeta, and nibabel's rule differs); Testing/io checks it against
SimpleITK and slicer-core's volume storage node for every code combination.

Outputs copy the input's header (qform and sform with their codes, pixdim, xyzt_units, qfac, intent,
descrip) and change only what describes the data (shape, type, scaling, display range), so every
reader that reads the input, whatever its qform/sform rule, reads each output on the same grid.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..errors import EsegetaError
from .geometry import affine_from, check_grid, check_spacing

# ITK's tolerances (itkNiftiImageIO.cxx): sform ~ qform element by element, and the "very similar" test.
_SIMILAR_MATRIX, _SIMILAR_OFFSET, _VERY_SIMILAR = 1e-5, 1e-7, 1e-4
_INTENT_GENMATRIX = 1004  # NIFTI_INTENT_GENMATRIX: ITK throws "not yet implemented"
_UNIT_SCALE = {"meter": 1e3, "mm": 1.0, "micron": 1e-3}  # ITK converts spatial units to millimetres


def _rotation_and_scales(m: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Polar decomposition of a 3x3: the nearest rotation (U V^T) and the singular values."""
    u, s, vt = np.linalg.svd(m)
    return u @ vt, s


def _decomposable(sform: np.ndarray) -> bool:
    """ITK's `sform_decomposable_without_skew`: invertible, and unit columns orthonormal to 1e-4."""
    m = sform[:3, :3]
    if not np.all(np.isfinite(sform)) or abs(np.linalg.det(m)) < 1e-12:
        return False
    unit = m / np.linalg.norm(m, axis=0)
    return bool(np.max(np.abs(unit @ unit.T - np.eye(3))) <= 1e-4)


def _very_similar(sform: np.ndarray, qform: np.ndarray) -> bool:
    """ITK's `sform_and_qform_are_very_similar`: same rotation, scales and offset to 1e-4.

    ITK compares the U factors of the two SVDs, which is ambiguous for isotropic voxels; the polar
    rotation U V^T is the unique quantity that test means.
    """
    rs, ss = _rotation_and_scales(sform[:3, :3])
    rq, sq = _rotation_and_scales(qform[:3, :3])
    return bool(np.max(np.abs(rs @ rq.T - np.eye(3))) <= _VERY_SIMILAR
                and np.max(np.abs(ss - sq)) <= _VERY_SIMILAR
                and np.max(np.abs(sform[:3, 3] - qform[:3, 3])) <= _VERY_SIMILAR)


def _check_form(header, name: str, fields) -> None:
    values = np.concatenate([np.ravel(np.asarray(header[f], dtype=np.float64)) for f in fields])
    if not np.all(np.isfinite(values)):
        raise EsegetaError(f"NIfTI {name} ({', '.join(fields)}) contains NaN or infinite numbers; fix the header")


def spatial_scale(header) -> float:
    """Millimetres per stored spatial unit (ITK: metre 1000, micron 0.001, anything else 1)."""
    return _UNIT_SCALE.get(header.get_xyzt_units()[0], 1.0)


def itk_affine(header) -> Tuple[np.ndarray, str]:
    """IJK->RAS (mm) as ITK reads this header, and which form it came from ('sform', 'qform', 'none').

    Raises `EsegetaError` (naming the field) for what ITK refuses or cannot represent: zero/negative
    pixdim, NaN in a form whose code is set, a sheared sform with no qform.
    """
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    scale = spatial_scale(header)
    check_spacing(pixdim, "NIfTI pixdim[1..3]")
    spacing = pixdim * scale
    if qcode <= 0 and scode <= 0:
        # No orientation: ITK puts the origin at 0 and the axes along L, P, S (nibabel would centre it).
        return affine_from(np.diag([-1.0, -1.0, 1.0]), spacing, (0.0, 0.0, 0.0)), "none"
    if qcode > 0:
        _check_form(header, "qform", ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"))
        qform = np.asarray(header.get_qform(), dtype=np.float64)
    else:  # nifti1_io: without a qform code, qto_xyz is the plain scaling
        qform = np.diag([*pixdim, 1.0])
    if scode > 0:
        _check_form(header, "sform", ("srow_x", "srow_y", "srow_z"))
        sform = np.asarray(header.get_sform(), dtype=np.float64)
    else:  # nifti1_io leaves sto_xyz zero
        sform = np.zeros((4, 4))
    similar = (np.max(np.abs(sform[:3, :3] - qform[:3, :3])) <= _SIMILAR_MATRIX
               and np.sum(np.abs(sform[:3, 3] - qform[:3, 3])) <= _SIMILAR_OFFSET
               and np.sum(np.abs(sform[3] - qform[3])) <= _SIMILAR_OFFSET)
    prefer_sform = similar
    if (not similar or scode > 0) and _decomposable(sform):
        if qcode <= 0 < scode or scode == 1:
            prefer_sform = True
        elif qcode > 0 and scode > 0:
            prefer_sform = _very_similar(sform, qform)
    if prefer_sform:
        chosen, source = sform, "sform"
    elif qcode > 0:
        chosen, source = qform, "qform"
    else:
        raise EsegetaError("NIfTI sform (srow_x/y/z) is sheared or singular and there is no qform (qform_code 0); "
                           "ITK and Slicer refuse it: resample the image onto a rotated grid first")
    direction = chosen[:3, :3] / np.linalg.norm(chosen[:3, :3], axis=0)
    return affine_from(direction, spacing, chosen[:3, 3] * scale), source


def read(path) -> Tuple[np.ndarray, np.ndarray, object]:
    """`(data (C,I,J,K) as stored * scl_slope + scl_inter, IJK->RAS as ITK reads it, header)`."""
    import nibabel as nib

    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise EsegetaError(f"{path} is not a NIfTI image")
    # nibabel "fixes" some header fields on load (a zero or negative pixdim becomes positive); ITK
    # reads them as stored, so take the geometry from the header exactly as the file holds it.
    with nib.openers.ImageOpener(path) as handle:
        header = type(img.header).from_fileobj(handle, check=False)
    shape = tuple(int(v) for v in header.get_data_shape())
    if len(shape) < 3:
        raise EsegetaError(f"{path} is a {len(shape)}-D image (NIfTI dim[0] = {len(shape)}); Esegeta explains 3-D "
                           "volumes: give the whole 3-D scan (not one slice), e.g. exported from Slicer as NIfTI")
    extra = [a for a in range(3, len(shape)) if shape[a] > 1]
    if len(extra) > 1:
        raise EsegetaError(f"{path} has more than one non-spatial axis (NIfTI dim = {list(shape)}); expected a 3-D "
                           "volume or 3-D + channels")
    if int(header["intent_code"]) == _INTENT_GENMATRIX:
        raise EsegetaError("NIfTI intent_code is GENMATRIX (a matrix per voxel); ITK and Slicer cannot read it: "
                           "save the volume with intent none")
    affine, _ = itk_affine(header)
    check_grid(affine, "NIfTI qform/sform")
    data = np.asanyarray(img.dataobj)  # applies scl_slope/inter as ITK does (slope 0 or NaN: none)
    data = data.reshape(shape[:3] + tuple(shape[a] for a in extra))
    array = data[None] if data.ndim == 3 else np.moveaxis(data, 3, 0)
    return array, affine, header


def write(path, array: np.ndarray, affine: np.ndarray, header=None) -> None:
    """Write `array` (C,I,J,K); with `header` (the input's), copy its geometry fields verbatim.

    Without a header (an image that came from elsewhere) both forms get `affine` with code 1, so
    readers that prefer either agree.
    """
    import nibabel as nib

    channels = array.shape[0]
    if header is None:
        data = array[0] if channels == 1 else np.moveaxis(array, 0, 3)
        img = nib.Nifti1Image(data, affine)
        img.header.set_sform(affine, code=1)
        img.header.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm")
        if channels > 1:
            img.header.set_intent("vector")
        nib.save(img, path)
        return
    hdr = header.copy()
    in_shape = tuple(int(v) for v in header.get_data_shape())
    if channels == 1:
        data = array[0]
    elif len(in_shape) >= 5 and in_shape[3] == 1:  # (I, J, K, 1, C): NIfTI's vector layout
        data = np.moveaxis(array, 0, 3)[:, :, :, None, :]
    else:
        data = np.moveaxis(array, 0, 3)
    if data.ndim < len(in_shape) or channels != int(np.prod(in_shape[3:], dtype=np.int64)):
        # Intent and time/vector pixdims describe the input's channels, not these.
        hdr.set_intent("none")
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_slope_inter(None, None)
    hdr["cal_min"], hdr["cal_max"] = 0.0, 0.0
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(data, None, header=hdr)
    nib.save(img, path)


def carried_header(header, affine: np.ndarray) -> Optional[object]:
    """`header` if ITK reads it as `affine` (to 1e-4 mm), else None (the grid changed since reading)."""
    if header is None:
        return None
    try:
        theirs, _ = itk_affine(header)
    except EsegetaError:
        return None
    return header if np.allclose(theirs, affine, atol=1e-4, rtol=0) else None


__all__ = ["itk_affine", "read", "write", "carried_header", "spatial_scale"]
