"""Every header variant of `header_family` against ITK itself (SimpleITK, and slicer-core's volume
storage node, which is how Slicer loads a volume): Esegeta reads the grid ITK reads, and every output
it writes for that input (a float map, a label map, a multi-channel image) is read by ITK on the same
grid with the values on the same voxels. Bad headers are refused with one line naming the field."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from header_family import all_variants, assert_same_world_values, slicer_volume  # noqa: E402

from EsegetaLib.errors import EsegetaError  # noqa: E402
from EsegetaLib.io import extension_for, read_image, write_image  # noqa: E402

sitk = pytest.importorskip("SimpleITK")
sitk.ProcessObject.SetGlobalWarningDisplay(False)

VARIANTS = all_variants()
GOOD = [v for v in VARIANTS if v.refuse is None and v.itk_reads]
BAD = [v for v in VARIANTS if v.refuse is not None]
TOL = 1e-4  # mm, and for direction cosines


def itk_grid(image):
    """(origin, spacing, direction) of the spatial axes, in ITK's LPS convention."""
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(n, n)[:3, :3]
    return np.asarray(image.GetOrigin()[:3]), np.asarray(image.GetSpacing()[:3]), direction


def our_grid(ijk_to_ras):
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return lps[:3, 3], spacing, lps[:3, :3] / spacing


def assert_same_grid(a, b, what):
    for name, x, y in zip(("origin", "spacing", "direction"), a, b):
        np.testing.assert_allclose(x, y, atol=TOL, rtol=0, err_msg=f"{what}: {name}")


def itk_cijk(image) -> np.ndarray:
    """SimpleITK's voxels as (C, I, J, K): vector components or a 4th image axis become C."""
    data = sitk.GetArrayFromImage(image)
    n = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:  # (K, J, I, C)
        return np.moveaxis(data.transpose(2, 1, 0, 3), 3, 0)
    if n == 4:  # (T, K, J, I)
        return data.transpose(0, 3, 2, 1)
    return data.transpose(2, 1, 0)[None]


@pytest.mark.parametrize("variant", GOOD, ids=[v.name for v in GOOD])
def test_input_and_outputs_on_itks_grid(tmp_path, variant):
    path = variant.make(tmp_path)
    itk_in = sitk.ReadImage(str(path))
    image = read_image(path)
    assert image.format == variant.fmt
    assert_same_grid(our_grid(image.ijk_to_ras), itk_grid(itk_in), "Esegeta's reading vs ITK's")
    np.testing.assert_array_equal(image.array, itk_cijk(itk_in).astype(np.float32))

    # The outputs Esegeta writes for this input: a float map, a label map, and a multi-channel image.
    ext = extension_for(image)
    rng = np.random.default_rng(1)
    outputs = {
        "map": rng.normal(size=image.spatial_shape).astype(np.float32),
        "labels": (rng.random(image.spatial_shape) > 0.5).astype(np.uint8),
        "channels": rng.normal(size=(2,) + image.spatial_shape).astype(np.float32),
    }
    for name, values in outputs.items():
        out = write_image(tmp_path / f"out_{name}{ext}", values, image)
        itk_out = sitk.ReadImage(out)
        assert_same_grid(itk_grid(itk_out), itk_grid(itk_in), f"{name} output vs input, both read by ITK")
        expected = values if values.ndim == 4 else values[None]
        np.testing.assert_array_equal(itk_cijk(itk_out), expected)  # each value on the voxel it was written for
        back = read_image(out)  # a mask or map read back by Esegeta (e.g. --region roi:) is on the input's grid
        np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=TOL, rtol=0)


def test_nifti_outputs_carry_both_forms_and_their_codes(tmp_path):
    """The issue's case: qform and sform differ (25 mm, 10 degrees). Outputs keep both, with codes,
    units and pixdim, so nibabel (sform first) and ITK (qform here) each read input and output alike."""
    import nibabel as nib

    variant = next(v for v in GOOD if v.name == "nifti qform 2 != sform 3")
    path = variant.make(tmp_path)
    image = read_image(path)
    out = write_image(tmp_path / "map.nii.gz", image.array[0], image)
    a, b = nib.load(str(path)).header, nib.load(out).header
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                  "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units"):
        np.testing.assert_array_equal(a[field], b[field], err_msg=field)
    np.testing.assert_array_equal(a["pixdim"][:4], b["pixdim"][:4])
    np.testing.assert_allclose(nib.load(out).affine, nib.load(str(path)).affine, atol=1e-6)  # nibabel agrees too
    # ITK takes the qform here, nibabel the sform: 25 mm apart. Esegeta's affine is ITK's.
    itk = sitk.ReadImage(str(path))
    assert_same_grid(our_grid(image.ijk_to_ras), itk_grid(itk), "qform chosen")
    assert np.linalg.norm(nib.load(str(path)).affine[:3, 3] - image.ijk_to_ras[:3, 3]) > 20


def test_scaled_nifti_values_as_itk_reads_them(tmp_path):
    variant = next(v for v in GOOD if v.name == "nifti scl_slope/inter")
    path = variant.make(tmp_path)
    raw = np.asarray(__import__("nibabel").load(str(path)).dataobj.get_unscaled())
    image = read_image(path)
    np.testing.assert_allclose(image.array[0], raw * 0.5 - 10.0)
    out = write_image(tmp_path / "map.nii.gz", image.array[0], image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(out)).transpose(2, 1, 0), image.array[0])


def test_nifti2_outputs_keep_the_header_itk_cannot_open(tmp_path):
    """SimpleITK 2.5 cannot open NIfTI-2 at all; Esegeta reads it with ITK's rule and its outputs
    stay NIfTI-2 with the input's geometry fields, so whatever reads the input reads the outputs alike."""
    import nibabel as nib

    variant = next(v for v in VARIANTS if not v.itk_reads)
    path = variant.make(tmp_path)
    image = read_image(path)
    np.testing.assert_allclose(image.ijk_to_ras[:3, 3], [10.0, -20.0, 30.0], atol=1e-5)  # the qform (code 1 < 3)
    out = write_image(tmp_path / "map.nii.gz", image.array[0], image)
    a, b = nib.load(str(path)), nib.load(out)
    assert isinstance(b, nib.Nifti2Image)
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "srow_x", "srow_z"):
        np.testing.assert_array_equal(a.header[field], b.header[field], err_msg=field)
    np.testing.assert_allclose(read_image(out).ijk_to_ras, image.ijk_to_ras, atol=1e-9)


@pytest.mark.parametrize("variant", BAD, ids=[v.name for v in BAD])
def test_bad_headers_refused_with_one_line_naming_the_field(tmp_path, variant):
    path = variant.make(tmp_path)
    with pytest.raises(EsegetaError) as info:
        read_image(path)
    message = str(info.value)
    assert "\n" not in message and variant.refuse in message, message
    assert path.name in message


# ------------------------------------------------------------------ Slicer's own reader (slicer-core)
# Scalar volumes (a multi-channel file loads as a vector volume node in Slicer).
SLICER_GOOD = [v for v in GOOD if not any(w in v.name for w in ("4-D", "5-D", "vector axis", "list axis", "RGB"))]


@pytest.mark.parametrize("variant", SLICER_GOOD, ids=[v.name for v in SLICER_GOOD])
def test_slicer_storage_node_reads_input_and_map_on_one_grid(tmp_path, variant):
    """Slicer loads the input and Esegeta's map as two nodes with equal IJK-to-RAS, each voxel at
    the RAS point where Esegeta computed it."""
    pytest.importorskip("slicer", reason="slicer-core (pip install esegeta[scene]) not installed")
    from EsegetaLib.slicer import scene as S

    path = variant.make(tmp_path)
    image = read_image(path)
    values = image.array[0] * 2 + 1
    out = write_image(tmp_path / f"map{extension_for(image)}", values, image)
    scene = S.new_scene()
    try:
        in_values, in_matrix = slicer_volume(scene, path)
        map_values, map_matrix = slicer_volume(scene, out)
    finally:
        S.release_scene(scene)
    np.testing.assert_allclose(map_matrix, in_matrix, atol=TOL, rtol=0)
    assert_same_world_values(image.array[0], image.ijk_to_ras, in_values, in_matrix, "input: Esegeta vs Slicer")
    assert_same_world_values(values, image.ijk_to_ras, map_values, map_matrix, "map: Esegeta vs Slicer")


REAL = ["mra/chris_MRA.nii.gz", "models/mindgrab/t1_crop.nii.gz", "mra/vmtk_aorta.mha"]


@pytest.mark.parametrize("name", REAL)
def test_real_volumes_read_as_itk_reads_them(tmp_path, name):
    """Volumes from the wild (../shared/data): Esegeta's grid is ITK's; a map written for the MRA
    (qform and sform codes 2) is read by ITK on the same grid."""
    from conftest import shared_file

    path = shared_file(*name.split("/"))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    image = read_image(path)
    itk = (np.asarray(reader.GetOrigin()), np.asarray(reader.GetSpacing()),
           np.asarray(reader.GetDirection()).reshape(3, 3))
    assert_same_grid(our_grid(image.ijk_to_ras), itk, name)
    if name.startswith("mra/chris"):
        out = write_image(tmp_path / "map.nii.gz", np.ones(image.spatial_shape, np.uint8), image)
        reader.SetFileName(out)
        reader.ReadImageInformation()
        assert_same_grid(itk, (np.asarray(reader.GetOrigin()), np.asarray(reader.GetSpacing()),
                               np.asarray(reader.GetDirection()).reshape(3, 3)), "map for " + name)


NRRD_GOOD = [v for v in GOOD if v.fmt == "nrrd"]
_LONG = {"ras": "right-anterior-superior", "las": "left-anterior-superior", "lps": "left-posterior-superior"}


@pytest.mark.parametrize("variant", NRRD_GOOD, ids=[v.name for v in NRRD_GOOD])
def test_nrrd_outputs_are_written_in_the_inputs_space(tmp_path, variant):
    """An NRRD output is in its input's space (RAS/LAS/LPS as read, long names), with the input's own
    numbers for directions and origin; ITK reads it on the input's grid, value for value (above).
    Spaces ITK takes verbatim as LPS (scanner-xyz, ...) and files without one are written in LPS."""
    import nrrd

    path = variant.make(tmp_path)
    image = read_image(path)
    _, header_in = nrrd.read(str(path))
    space_in = str(header_in.get("space", "")).strip().lower()
    space_in = _LONG.get(space_in, space_in)
    anatomical = space_in in _LONG.values()
    values = np.random.default_rng(2).normal(size=image.spatial_shape).astype(np.float32)
    out = write_image(tmp_path / "map.nrrd", values, image)
    _, header_out = nrrd.read(out)
    assert header_out["space"] == (space_in if anatomical else "left-posterior-superior")
    itk_in, itk_out = sitk.ReadImage(str(path)), sitk.ReadImage(out)
    assert_same_grid(itk_grid(itk_out), itk_grid(itk_in), "output vs input, both read by ITK")
    np.testing.assert_array_equal(itk_cijk(itk_out)[0], values)
    if anatomical and "space directions" in header_in:
        rows = np.asarray(header_in["space directions"], dtype=float)
        domain = [a for a in range(rows.shape[0]) if np.all(np.isfinite(rows[a]))]
        np.testing.assert_allclose(header_out["space directions"], rows[domain], atol=1e-9, rtol=1e-12)
        origin = np.asarray(header_in.get("space origin", np.zeros(3)), dtype=float)
        np.testing.assert_allclose(header_out["space origin"], origin, atol=1e-9, rtol=1e-12)
