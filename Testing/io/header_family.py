"""A generated family of image headers: every NIfTI, NRRD and MetaImage variant Esegeta must read as
ITK (and so 3D Slicer) reads it, and the bad headers it must refuse with one line naming the field.

Each `Variant` writes one small volume (a few hundred voxels, distinct values so a flip or a
transposition shows) and says what to expect: `refuse=None` (read, on ITK's grid) or a piece of
the one-line refusal. `python Testing/io/header_family.py` prints the table of variants and results.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

SHAPE = (5, 6, 7)  # I, J, K: all different, so a transposition changes the shape


@dataclass
class Variant:
    name: str
    fmt: str
    make: Callable[[Path], Path]
    refuse: Optional[str] = None  # a piece of the expected one-line message, None = must read
    note: str = ""
    itk_reads: bool = True  # False: SimpleITK/ITK cannot open this file at all (no reference to compare with)


def rotation(angles_deg) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()


def affine(angles=(10.0, -20.0, 30.0), spacing=(0.5, 0.6, 0.7), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation(angles) * np.asarray(spacing)
    m[:3, 3] = origin
    return m


# The example: a second transform 25 mm away and rotated by 10 degrees.
QFORM = affine()
SFORM = affine(angles=(20.0, -20.0, 30.0), origin=(35.0, -20.0, 30.0))


def values(shape=SHAPE, dtype=np.float32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(int(np.prod(shape))).reshape(shape).astype(dtype) + 1


# ------------------------------------------------------------------------------------------ NIfTI
def _nifti(name, q=None, s=None, qcode=1, scode=1, data=None, ext=".nii.gz", units="mm", klass=None,
           pixdim=None, intent=None, slope=None):
    import nibabel as nib

    def make(folder: Path) -> Path:
        arr = values() if data is None else data()
        img = (klass or nib.Nifti1Image)(arr, None)
        h = img.header
        h.set_xyzt_units(units)
        if q is not None:
            h.set_qform(q, code=qcode)
        if s is not None:
            h.set_sform(s, code=scode)
        h["qform_code"] = qcode if q is not None else 0
        h["sform_code"] = scode if s is not None else 0
        if intent:
            h.set_intent(intent)
        if slope is not None:
            h.set_slope_inter(*slope)
        path = folder / f"{name}{ext}"
        nib.save(img, str(path))
        if pixdim is not None:  # nibabel would "fix" a zero pixdim on save: patch the stored bytes
            _patch_pixdim(path, pixdim)
        return path
    return make


def _patch_pixdim(path: Path, pixdim) -> None:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        blob = bytearray(f.read())
    blob[80:92] = np.asarray(pixdim, dtype="<f4").tobytes()  # pixdim[1..3] (NIfTI-1: pixdim at byte 76)
    with opener(path, "wb") as f:
        f.write(bytes(blob))


def _sheared():
    m = affine()
    m[:3, 1] += 0.3 * m[:3, 0]
    return m


def _nan_sform():
    m = affine()
    m[0, 3] = np.nan
    return m


def _scaled_data():
    return (values(dtype=np.int16) % 300).astype(np.int16)


def nifti_variants() -> List[Variant]:
    import nibabel as nib

    out = [
        Variant("nifti qform only", "nifti", _nifti("q_only", q=QFORM)),
        Variant("nifti sform only (code 1)", "nifti", _nifti("s_only", s=SFORM, qcode=0)),
        Variant("nifti sform only (code 2)", "nifti", _nifti("s_only2", s=SFORM, qcode=0, scode=2)),
        Variant("nifti qform = sform", "nifti", _nifti("equal", q=QFORM, s=QFORM)),
        Variant("nifti no qform, no sform", "nifti", _nifti("no_forms", qcode=0, scode=0)),
    ]
    for qcode in range(1, 5):
        for scode in range(1, 5):
            chosen = "sform" if scode == 1 else "qform"
            out.append(Variant(f"nifti qform {qcode} != sform {scode}", "nifti",
                               _nifti(f"differ_q{qcode}_s{scode}", q=QFORM, s=SFORM, qcode=qcode, scode=scode),
                               note=f"ITK uses the {chosen}"))
    out += [
        Variant("nifti differ, .nii uncompressed", "nifti", _nifti("differ_plain", q=QFORM, s=SFORM, scode=2, ext=".nii")),
        Variant("nifti-2 qform != sform", "nifti", _nifti("nifti2", q=QFORM, s=SFORM, scode=3, klass=nib.Nifti2Image),
                note="SimpleITK 2.5 cannot open NIfTI-2; outputs stay NIfTI-2 with the same fields", itk_reads=False),
        Variant("nifti radiological (qfac -1)", "nifti",
                _nifti("radiological", q=QFORM @ np.diag([-1.0, 1, 1, 1]), s=QFORM @ np.diag([-1.0, 1, 1, 1]))),
        Variant("nifti units micron", "nifti",
                _nifti("micron", q=affine(spacing=(500, 600, 700), origin=(1e4, -2e4, 3e4)), units="micron")),
        Variant("nifti units metre", "nifti",
                _nifti("metre", q=affine(spacing=(5e-4, 6e-4, 7e-4), origin=(0.01, -0.02, 0.03)), units="meter")),
        Variant("nifti scl_slope/inter", "nifti", _nifti("scaled", q=QFORM, s=SFORM, scode=2, data=_scaled_data,
                                                         slope=(0.5, -10.0))),
        Variant("nifti 4-D channels (I,J,K,T)", "nifti",
                _nifti("four_d", q=QFORM, s=SFORM, scode=2, data=lambda: values(SHAPE + (2,)))),
        Variant("nifti 5-D vector (I,J,K,1,C)", "nifti",
                _nifti("vector", q=QFORM, s=SFORM, scode=2, data=lambda: values(SHAPE + (1, 2)), intent="vector")),
        Variant("nifti sheared sform + qform", "nifti", _nifti("sheared_s_q", q=QFORM, s=_sheared(), scode=2),
                note="ITK uses the qform"),
        Variant("nifti sheared sform, no qform", "nifti", _nifti("sheared_s", s=_sheared(), qcode=0), refuse="sform"),
        Variant("nifti zero pixdim", "nifti", _nifti("zero_pixdim", q=QFORM, pixdim=(0.5, 0.0, 0.7)), refuse="pixdim"),
        Variant("nifti NaN in sform", "nifti", _nifti("nan_sform", q=QFORM, s=_nan_sform()), refuse="sform"),
        Variant("nifti intent GENMATRIX", "nifti", _nifti("genmatrix", q=QFORM, intent=1004),
                refuse="intent_code"),
        Variant("nifti 2-D image", "nifti", _nifti("flat", q=QFORM, data=lambda: values((5, 6))), refuse="2-D"),
    ]
    return out


# ------------------------------------------------------------------------------------------- NRRD
def _vec(v) -> str:
    return "none" if v is None else "(" + ",".join(repr(float(x)) for x in v) + ")"


def _nrrd(name, fields, data=None, encoding="raw", detached=False):
    """A NRRD written by hand, so that every field is exactly what the variant says."""
    def make(folder: Path) -> Path:
        arr = values() if data is None else data()
        raw = np.asfortranarray(arr).tobytes(order="F")  # NRRD: first axis fastest
        payload = gzip.compress(raw) if encoding == "gzip" else raw
        lines = ["NRRD0004", "type: float", f"dimension: {arr.ndim}",
                 "sizes: " + " ".join(str(s) for s in arr.shape), *fields,
                 f"encoding: {encoding}", "endian: little"]
        if detached:
            data_name = f"{name}.{'raw.gz' if encoding == 'gzip' else 'raw'}"
            (folder / data_name).write_bytes(payload)
            path = folder / f"{name}.nhdr"
            path.write_text("\n".join(lines + [f"data file: {data_name}"]) + "\n")
        else:
            path = folder / f"{name}.nrrd"
            path.write_bytes(("\n".join(lines) + "\n\n").encode() + payload)
        return path
    return make


def _space_fields(space=None, m=QFORM, origin=True, extra=()):
    fields = [f"space: {space}"] if space else []
    fields.append("space directions: " + " ".join(_vec(m[:3, a]) for a in range(3)))
    if origin:
        fields.append("space origin: " + _vec(m[:3, 3]))
    return fields + list(extra)


def nrrd_variants() -> List[Variant]:
    out = []
    for space in ["right-anterior-superior", "left-anterior-superior", "left-posterior-superior", "RAS", "LAS", "LPS"]:
        out.append(Variant(f"nrrd space {space}", "nrrd", _nrrd(f"space_{space}", _space_fields(space))))
    for space in ["scanner-xyz", "3D-right-handed", "3D-left-handed"]:
        out.append(Variant(f"nrrd space {space}", "nrrd", _nrrd(f"space_{space}", _space_fields(space)),
                           note="ITK takes the numbers as LPS"))
    rast = ["space: right-anterior-superior-time",
            "space directions: (0.5,0,0,0) (0,0.6,0,0) (0,0,0.7,0) (0,0,0,2)", "space origin: (1,2,3,0)"]
    for space in ["right-anterior-superior-time", "left-posterior-superior-time", "scanner-xyz-time"]:
        fields = [f"space: {space}"] + rast[1:]
        out.append(Variant(f"nrrd space {space} (4-D)", "nrrd", _nrrd(f"space_{space}", fields,
                                                                       data=lambda: values(SHAPE + (2,))),
                           refuse="space"))
    out += [
        Variant("nrrd space dimension, no space", "nrrd", _nrrd("space_dim", ["space dimension: 3"] + _space_fields()),
                note="ITK takes the numbers as LPS"),
        Variant("nrrd no space origin", "nrrd", _nrrd("no_origin", _space_fields("RAS", origin=False))),
        Variant("nrrd spacings only", "nrrd", _nrrd("spacings", ["spacings: 0.5 0.6 0.7"])),
        Variant("nrrd spacings + axis mins", "nrrd", _nrrd("axis_mins", ["spacings: 0.5 0.6 0.7", "axis mins: 1 2 3"])),
        Variant("nrrd spacings + axis mins, node centers", "nrrd",
                _nrrd("axis_mins_node", ["spacings: 0.5 0.6 0.7", "axis mins: 1 2 3", "centers: node node node"])),
        Variant("nrrd no geometry at all", "nrrd", _nrrd("bare", [])),
        Variant("nrrd kinds domain", "nrrd", _nrrd("kinds_domain", _space_fields("LPS", extra=["kinds: domain domain domain"]))),
        Variant("nrrd kinds space", "nrrd", _nrrd("kinds_space", _space_fields("RAS", extra=["kinds: space space space"]))),
        Variant("nrrd vector axis first", "nrrd",
                _nrrd("vector_first", ["space: LAS", "space directions: none " + " ".join(_vec(QFORM[:3, a]) for a in range(3)),
                                       "space origin: " + _vec(QFORM[:3, 3]), "kinds: vector domain domain domain"],
                      data=lambda: values((2,) + SHAPE))),
        Variant("nrrd list axis last", "nrrd",
                _nrrd("list_last", ["space: RAS", "space directions: " + " ".join(_vec(QFORM[:3, a]) for a in range(3)) + " none",
                                    "space origin: " + _vec(QFORM[:3, 3]), "kinds: domain domain domain list"],
                      data=lambda: values(SHAPE + (2,)))),
        Variant("nrrd RGB-color axis first", "nrrd",
                _nrrd("rgb", ["space: LPS", "space directions: none " + " ".join(_vec(QFORM[:3, a]) for a in range(3)),
                              "space origin: " + _vec(QFORM[:3, 3]), "kinds: RGB-color domain domain domain"],
                      data=lambda: values((3,) + SHAPE))),
        Variant("nrrd gzip", "nrrd", _nrrd("gzip", _space_fields("RAS"), encoding="gzip")),
        Variant("nrrd detached .nhdr raw", "nrrd", _nrrd("detached", _space_fields("LAS"), detached=True)),
        Variant("nrrd detached .nhdr gzip", "nrrd", _nrrd("detached_gz", _space_fields("LPS"), encoding="gzip",
                                                          detached=True)),
        Variant("nrrd time axis as 4th domain axis", "nrrd",
                _nrrd("time_axis", ["space: RAS", "space directions: " + " ".join(_vec(QFORM[:3, a]) for a in range(3)) + " none",
                                    "space origin: " + _vec(QFORM[:3, 3]), "kinds: domain domain domain time"],
                      data=lambda: values(SHAPE + (2,))), refuse="spatial axes"),
        Variant("nrrd zero space direction", "nrrd",
                _nrrd("zero_dir", ["space: RAS", "space directions: (0,0,0) (0,0.6,0) (0,0,0.7)"]),
                refuse="space directions"),
        Variant("nrrd non-orthogonal directions", "nrrd", _nrrd("sheared", _space_fields("RAS", m=_sheared())),
                refuse="space directions"),
        Variant("nrrd NaN in space origin", "nrrd",
                _nrrd("nan_origin", _space_fields("RAS", origin=False, extra=["space origin: (nan,1,2)"])),
                refuse="space origin"),
        Variant("nrrd spacings and space directions", "nrrd",
                _nrrd("both_spacings", _space_fields("RAS", extra=["spacings: 0.5 0.6 0.7"])), refuse="spacings"),
        Variant("nrrd 2-D image", "nrrd", _nrrd("flat", ["spacings: 0.5 0.6"], data=lambda: values((5, 6))),
                refuse="2-D"),
    ]
    return out


# -------------------------------------------------------------------------------------- MetaImage
def _mha(name, extra, spacing="0.5 0.6 0.7", ndims=3, detached=False, data=None):
    def make(folder: Path) -> Path:
        arr = values() if data is None else data()
        dims = " ".join(str(s) for s in arr.shape)
        raw = np.asfortranarray(arr).tobytes(order="F")
        lines = ["ObjectType = Image", f"NDims = {ndims}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
                 "CompressedData = False", *extra, f"ElementSpacing = {spacing}", f"DimSize = {dims}",
                 "ElementType = MET_FLOAT"]
        if detached:
            (folder / f"{name}.raw").write_bytes(raw)
            path = folder / f"{name}.mhd"
            path.write_text("\n".join(lines + [f"ElementDataFile = {name}.raw"]) + "\n")
        else:
            path = folder / f"{name}.mha"
            path.write_bytes(("\n".join(lines + ["ElementDataFile = LOCAL"]) + "\n").encode() + raw)
        return path
    return make


def _transform_fields(m=QFORM):
    lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :3]
    unit = lps / np.linalg.norm(lps, axis=0)
    origin = np.array([-1.0, -1.0, 1.0]) * m[:3, 3]
    # MetaImage TransformMatrix lists the direction column by column (ITK reads it transposed).
    return ["TransformMatrix = " + " ".join(repr(float(v)) for v in unit.T.ravel()),
            "Offset = " + " ".join(repr(float(v)) for v in origin)]


def metaimage_variants() -> List[Variant]:
    return [
        Variant("mha TransformMatrix, no AnatomicalOrientation", "metaimage", _mha("no_orient", _transform_fields())),
        Variant("mha TransformMatrix + AnatomicalOrientation", "metaimage",
                _mha("orient", _transform_fields() + ["AnatomicalOrientation = RAI"])),
        Variant("mha AnatomicalOrientation only", "metaimage", _mha("orient_only", ["AnatomicalOrientation = LPS"]),
                note="ITK ignores AnatomicalOrientation"),
        Variant("mhd detached", "metaimage", _mha("detached", _transform_fields(), detached=True)),
        Variant("mha sheared TransformMatrix", "metaimage",
                _mha("sheared", ["TransformMatrix = 1 0.3 0 0 1 0 0 0 1"]), refuse="TransformMatrix"),
        Variant("mha zero ElementSpacing", "metaimage", _mha("zero_spacing", [], spacing="0 0.6 0.7"),
                refuse="ElementSpacing"),
        Variant("mha 2-D image", "metaimage", _mha("flat", [], spacing="0.5 0.6", ndims=2,
                                                  data=lambda: values((5, 6))), refuse="2-D"),
    ]


# ------------------------------------------------------------- representatives for end-to-end runs
EXPLAIN_SHAPE = (20, 16, 12)
# A few bright voxels on a zero background, placed so that any flip or transposition moves them.
BLOB = [(3, 4, 2), (4, 4, 2), (14, 11, 8), (6, 12, 9)]


def blob() -> np.ndarray:
    data = np.zeros(EXPLAIN_SHAPE, dtype=np.float32)
    for n, ijk in enumerate(BLOB):
        data[ijk] = 50 + 10 * n
    return data


def representatives() -> List[Variant]:
    """The variants readers disagree on, as volumes big enough for a real network (explain runs)."""
    return [
        # ITK takes the qform, nibabel the sform: 25 mm and 10 degrees apart.
        Variant("nifti qform 2 != sform 3", "nifti", _nifti("differ", q=QFORM, s=SFORM, qcode=2, scode=3, data=blob)),
        # Left-handed in LPS (Slicer stores such a grid with K reversed).
        Variant("nrrd LAS detached gzip", "nrrd", _nrrd("las", _space_fields("LAS"), data=blob, detached=True,
                                                        encoding="gzip")),
        Variant("nrrd spacings, no space", "nrrd", _nrrd("spacings", ["spacings: 0.5 0.6 0.7", "axis mins: 1 2 3"],
                                                         data=blob)),
        Variant("mha with AnatomicalOrientation", "metaimage",
                _mha("orient", _transform_fields() + ["AnatomicalOrientation = RAI"], data=blob)),
    ]


# ------------------------------------------------------------------ Slicer's own reader (slicer-core)
def slicer_volume(scene, path):
    """(values (I,J,K), IJK-to-RAS) of a volume node loaded by Slicer's vtkMRMLVolumeArchetypeStorageNode."""
    from EsegetaLib.slicer import scene as S

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return S.array_from_volume(node)


def assert_same_world_values(values_a, affine_a, values_b, affine_b, what):
    """Every voxel of A holds the value of the voxel of B at the same RAS point.

    Slicer stores a left-handed grid with its K axis reversed (data and matrix together); that is
    the same image, so compare values at world points rather than matrices."""
    t = np.linalg.inv(affine_b) @ affine_a  # A's index -> B's index
    assert np.allclose(t[:3, :3], np.rint(t[:3, :3]), atol=1e-4) and np.allclose(t[:3, 3], np.rint(t[:3, 3]), atol=1e-3), \
        f"{what}: the grids are not the same voxels\n{t}"
    ijk = np.indices(values_a.shape).reshape(3, -1)
    mapped = np.rint(t[:3, :3] @ ijk + t[:3, 3:4]).astype(int)
    assert all((mapped[d] >= 0).all() and (mapped[d] < values_b.shape[d]).all() for d in range(3)), what
    np.testing.assert_array_equal(values_b[tuple(mapped)], values_a[tuple(ijk)], err_msg=what)


def all_variants() -> List[Variant]:
    return nifti_variants() + nrrd_variants() + metaimage_variants()


def itk_verdict(path: Path) -> str:
    """What SimpleITK (ITK 5.4) does with the file: 'reads' or 'refuses'."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return "n/a"
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        sitk.ReadImage(str(path))
        return "reads"
    except RuntimeError:
        return "refuses"


def table(folder: Path) -> str:
    """Markdown table: every variant, what ITK does, and Esegeta's result (pass, or its one line)."""
    from EsegetaLib.errors import EsegetaError
    from EsegetaLib.io import read_image

    rows = ["| variant | SimpleITK | Esegeta | detail |", "| --- | --- | --- | --- |"]
    for v in all_variants():
        path = v.make(folder)
        try:
            read_image(path)
            result, detail = "pass", v.note
        except EsegetaError as exc:
            result, detail = "refused", str(exc).replace(str(path) + ": ", "").replace(str(path), os.path.basename(path))
        rows.append(f"| {v.name} | {itk_verdict(path)} | {result} | {detail} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(table(Path(tmp)))
