"""Geometry and values survive every reader/writer, checked against SimpleITK and nibabel."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from EsegetaLib.errors import EsegetaError
from EsegetaLib.io import Image, extension_for, format_of, read_image, write_image

SimpleITK = pytest.importorskip("SimpleITK")

EXTENSIONS = [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"]
# NIfTI stores its affine as float32: about 1e-7 relative, so 1e-5 mm at 100 mm from the origin.
AFFINE_TOL = {"nifti": 2e-5, "nrrd": 1e-6, "metaimage": 1e-6}


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def grid(kind: str) -> np.ndarray:
    """Oblique, anisotropic, axis-flipped and plain grids with non-zero origins."""
    affine = np.eye(4)
    if kind == "oblique":
        affine[:3, :3] = rotation([1, 2, 3], 27) @ np.diag([0.43, 0.37, 0.81])
        affine[:3, 3] = [-101.3, 57.25, 23.5]
    elif kind == "flipped":  # negative determinant: I and K reversed, as radiological storage
        affine[:3, :3] = rotation([0, 0, 1], 10) @ np.diag([-0.5, 0.5, -1.2])
        affine[:3, 3] = [80.0, -120.5, -60.125]
    elif kind == "axis_permuted":  # IJK axes point along other world axes (sagittal storage)
        affine[:3, :3] = np.array([[0, 0, -0.9], [0.35, 0, 0], [0, -0.35, 0]])
        affine[:3, 3] = [12.0, -30.0, 44.0]
    else:
        affine[:3, :3] = np.diag([0.3, 0.3, 0.5])
        affine[:3, 3] = [1.5, 2.5, -3.5]
    return affine


def make_image(kind: str, channels: int = 1, seed: int = 0) -> Image:
    rng = np.random.default_rng(seed)
    array = rng.normal(100, 30, size=(channels, 7, 9, 5)).astype(np.float32)
    return Image(array=array, ijk_to_ras=grid(kind), format="nifti")


def world(affine: np.ndarray, shape) -> np.ndarray:
    """RAS position of every voxel centre, (N, 3)."""
    ijk = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T


GRIDS = ["oblique", "flipped", "axis_permuted", "plain"]


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_every_format(tmp_path, ext, kind, channels):
    image = make_image(kind, channels)
    path = tmp_path / f"vol{ext}"
    write_image(path, image.array, image)
    back = read_image(path)
    assert back.format == format_of(path)
    assert back.array.dtype == np.float32 and back.array.shape == image.array.shape
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, rtol=0, atol=AFFINE_TOL[back.format])
    np.testing.assert_allclose(back.spacing, image.spacing, atol=1e-6)
    # Nothing but the written files is left in the folder (temporary files removed).
    expected = {path.name} | ({"vol.raw.gz"} if ext == ".nhdr" else set()) | (
        {"vol.zraw"} if ext == ".mhd" else set())
    assert set(os.listdir(tmp_path)) == expected


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", GRIDS)
def test_simpleitk_sees_the_same_voxels_at_the_same_places(tmp_path, ext, kind):
    """An independent reader (ITK, LPS) agrees with ours (RAS) on every voxel's value and position."""
    image = make_image(kind)
    path = str(tmp_path / f"vol{ext}")
    write_image(path, image.array, image)
    itk = SimpleITK.ReadImage(path)
    np.testing.assert_array_equal(SimpleITK.GetArrayFromImage(itk).transpose(2, 1, 0), image.array[0])
    for ijk in [(0, 0, 0), (6, 8, 4), (3, 1, 2), (0, 8, 0)]:
        lps = np.array(itk.TransformIndexToPhysicalPoint(ijk))
        ras = image.ijk_to_ras @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(lps * [-1, -1, 1], ras[:3], atol=1e-4)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", GRIDS)
def test_reads_files_written_by_simpleitk(tmp_path, ext, kind):
    """Files from an independent writer: our IJK->RAS maps each voxel where ITK says it is."""
    rng = np.random.default_rng(1)
    kji = rng.integers(0, 1000, size=(5, 9, 7)).astype(np.int16)
    itk = SimpleITK.GetImageFromArray(kji)
    lps = np.diag([-1.0, -1.0, 1.0]) @ grid(kind)[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    itk.SetSpacing(spacing.tolist())
    itk.SetDirection((lps / spacing).ravel().tolist())
    itk.SetOrigin((np.array([-1.0, -1.0, 1.0]) * grid(kind)[:3, 3]).tolist())
    path = str(tmp_path / f"itk{ext}")
    SimpleITK.WriteImage(itk, path)
    ours = read_image(path)
    np.testing.assert_array_equal(ours.array[0], kji.transpose(2, 1, 0))
    for ijk in [(0, 0, 0), (6, 8, 4), (2, 7, 1)]:
        expected = np.array(itk.TransformIndexToPhysicalPoint(ijk)) * [-1, -1, 1]
        np.testing.assert_allclose((ours.ijk_to_ras @ [*ijk, 1.0])[:3], expected, atol=1e-4)


def test_nibabel_agrees_on_our_nifti(tmp_path):
    image = make_image("flipped")
    path = tmp_path / "v.nii.gz"
    write_image(path, image.array, image)
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, image.ijk_to_ras, atol=2e-5)
    np.testing.assert_allclose(img.get_qform(), image.ijk_to_ras, atol=2e-5)  # qform agrees too
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), image.array[0])


@pytest.mark.parametrize("kind", GRIDS)
def test_cross_format_keeps_every_voxel_in_place(tmp_path, kind):
    """NIfTI -> NRRD -> MetaImage -> NIfTI: every voxel keeps its value and world position."""
    image = make_image(kind, seed=3)
    first = tmp_path / "a.nii.gz"
    write_image(first, image.array, image)
    current = read_image(first)
    for name in ["b.nrrd", "c.mha", "d.nii.gz"]:
        write_image(tmp_path / name, current.array, current)
        current = read_image(tmp_path / name)
    np.testing.assert_array_equal(current.array, image.array)
    np.testing.assert_allclose(world(current.ijk_to_ras, image.spatial_shape),
                               world(image.ijk_to_ras, image.spatial_shape), atol=5e-5)


def test_nrrd_in_ras_space_and_slicer_vector_layout(tmp_path):
    """A RAS-space NRRD and a channel-first vector NRRD (Slicer's layout) read correctly."""
    import nrrd

    affine = grid("oblique")
    data = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    header = {"space": "right-anterior-superior", "space origin": affine[:3, 3],
              "space directions": np.vstack([np.full(3, np.nan), affine[:3, :3].T]),
              "kinds": ["vector", "domain", "domain", "domain"]}
    nrrd.write(str(tmp_path / "ras.nrrd"), data, header)
    back = read_image(tmp_path / "ras.nrrd")
    np.testing.assert_allclose(back.ijk_to_ras, affine, atol=1e-9)
    np.testing.assert_array_equal(back.array, data)
    # The vector axis last (as some tools write it) is moved to the front.
    header["space directions"] = np.vstack([affine[:3, :3].T, np.full(3, np.nan)])
    header["kinds"] = ["domain", "domain", "domain", "vector"]
    nrrd.write(str(tmp_path / "last.nrrd"), np.moveaxis(data, 0, 3), header)
    np.testing.assert_array_equal(read_image(tmp_path / "last.nrrd").array, data)


def test_dtypes_kept_or_chosen(tmp_path):
    image = make_image("oblique")
    labels = (image.array[0] > 100).astype(np.uint8)
    write_image(tmp_path / "labels.nrrd", labels, image)
    import nrrd

    data, header = nrrd.read(str(tmp_path / "labels.nrrd"))
    assert data.dtype == np.uint8 and header["type"] in ("uint8", "unsigned char")
    write_image(tmp_path / "f.nii.gz", image.array.astype(np.float64), image)
    assert nib.load(tmp_path / "f.nii.gz").get_data_dtype() == np.float32
    with pytest.raises(EsegetaError, match="do not fit"):  # never wrap around silently
        write_image(tmp_path / "u.mha", image.array - 200, image, dtype=np.uint16)
    assert not (tmp_path / "u.mha").exists()
    image.array = np.abs(image.array)
    write_image(tmp_path / "u.mha", image.array, image, dtype=np.uint16)
    assert SimpleITK.ReadImage(str(tmp_path / "u.mha")).GetPixelID() == SimpleITK.sitkUInt16
    np.testing.assert_array_equal(read_image(tmp_path / "u.mha").array, np.rint(image.array))


def test_extension_for_input_family():
    image = make_image("plain")
    for fmt, ext in [("nifti", ".nii.gz"), ("nrrd", ".nrrd"), ("metaimage", ".mha")]:
        image.format = fmt
        assert extension_for(image) == ext


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_missing_folder_and_unknown_extension(tmp_path):
    with pytest.raises(EsegetaError) as e:
        read_image(tmp_path / "nope.nii.gz")
    assert "not found" in one_line_error(e)
    with pytest.raises(EsegetaError) as e:
        read_image(tmp_path)
    assert "folder" in one_line_error(e)
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(EsegetaError) as e:
        read_image(tmp_path / "x.png")
    assert ".nii.gz" in one_line_error(e)


@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.nii", "bad.nrrd", "bad.mha"])
def test_not_an_image(tmp_path, name):
    (tmp_path / name).write_text("this is not an image\n" * 20)
    with pytest.raises(EsegetaError) as e:
        read_image(tmp_path / name)
    assert "cannot read" in one_line_error(e) and name in str(e.value)


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can read files without read permission")
    path = tmp_path / "locked.nii.gz"
    write_image(path, make_image("plain").array, make_image("plain"))
    path.chmod(0)
    with pytest.raises(EsegetaError):
        read_image(path)


def test_write_is_atomic(tmp_path):
    """A failed write leaves neither a partial file nor temporaries; a good one replaces whole."""
    image = make_image("oblique")
    target = tmp_path / "map.nii.gz"
    write_image(target, image.array, image)
    before = target.read_bytes()
    with pytest.raises(EsegetaError):
        write_image(target, image.array[:, :3], image)  # not on the reference grid
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["map.nii.gz"]
    with pytest.raises(Exception):
        write_image(target, np.empty((1, 7, 9, 5), dtype=object), image)  # no image type
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["map.nii.gz"]
    write_image(target, image.array * 2, image)
    np.testing.assert_array_equal(read_image(target).array, image.array * 2)
    assert os.listdir(tmp_path) == ["map.nii.gz"]


def test_two_dimensional_file_is_refused_with_its_name(tmp_path):
    import nrrd

    nrrd.write(str(tmp_path / "flat.nrrd"), np.zeros((4, 5), np.float32))
    with pytest.raises(EsegetaError) as e:
        read_image(tmp_path / "flat.nrrd")
    assert "flat.nrrd" in one_line_error(e) and "3" in str(e.value)
