"""nnU-Net v2 trained-model folders: built with nnU-Net's own classes, checked against nnU-Net's
own predictor, gradients exact through its resampling and sliding window."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net tests need the nnunet extra (pip install 'esegeta[nnunet]')")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_helpers import (RESENC, anisotropic_affine, dice, make_nnunet_folder, plans,  # noqa: E402
                            tube_volume)

from EsegetaLib.cli import main  # noqa: E402
from EsegetaLib.errors import EsegetaError  # noqa: E402
from EsegetaLib.models import load_model  # noqa: E402

SPACING = (0.8, 0.9, 2.5)  # anisotropic along K: nnU-Net resamples that axis separately


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    folder = make_nnunet_folder(root, folds=(0, 1))
    return root, folder


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory):
    from EsegetaLib.io import Image, write_image

    path = tmp_path_factory.mktemp("vol") / "case_0000.nii.gz"
    array = tube_volume()
    write_image(path, array, Image(array=array, ijk_to_ras=anisotropic_affine(SPACING), format="nifti"))
    return path


def nnunet_prediction(folder: Path, volume: Path, out: Path, folds, mirroring: bool = False) -> Path:
    """nnU-Net's own predictor on the file (its SimpleITK reader, preprocessing and export)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds,
                                                   checkpoint_name="checkpoint_final.pth")
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential([[str(volume)]], str(out), save_probabilities=False, overwrite=True,
                                            folder_with_segs_from_prev_stage=None)
    return out / volume.name.replace("_0000.nii.gz", ".nii.gz")  # nnU-Net's case name


@pytest.mark.parametrize("fold, mirroring", [("0", False), (None, False), ("0", True)])
def test_segmentation_equals_nnunet_predictor(nnunet_root, volume_file, tmp_path, capsys, fold, mirroring):
    """esegeta explain on the folder = nnUNetPredictor on the same file: Dice >= 0.99, same grid.
    fold None: both folds, ensembled (mean of the folds' logits) by both; mirroring: nnU-Net's
    test-time mirroring (its predictor's default) in both."""
    from EsegetaLib.io import read_image

    _, folder = nnunet_root
    argv = ["explain", str(volume_file), "--model", str(folder), "--out", str(tmp_path / "run"),
            "--methods", "Saliency", "--metrics", "none", "--no-scene", "--device", "cpu", "--region", "whole"]
    if fold is not None:
        argv += ["--fold", fold]
    if mirroring:
        argv += ["--mirroring"]
    assert main(argv) == 0, capsys.readouterr().err
    notes = capsys.readouterr().err
    assert "nnU-Net v2 trained-model folder" in notes and "PlainConvUNet" in notes
    ours = read_image(tmp_path / "run" / "segmentation.nii.gz")
    reference = read_image(nnunet_prediction(folder, volume_file, tmp_path / "nnunet",
                                             (0,) if fold else (0, 1), mirroring))
    assert ours.array.shape == reference.array.shape
    np.testing.assert_allclose(ours.ijk_to_ras, reference.ijk_to_ras, atol=1e-5)
    score = dice(ours.array[0], reference.array[0])
    print(f"\nfold {fold or '0+1'}, mirroring {mirroring}: Dice vs nnUNetPredictor {score:.4f}, foreground "
          f"{int((reference.array > 0).sum())} voxels")
    assert (reference.array > 0).sum() > 100 and (reference.array == 0).sum() > 100
    assert score >= 0.99
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    described = run["parameters"]["model_description"]
    assert described["format"] == "nnunet" and described["classes"] == ["background", "vessel"]
    pre = run["engine"]["model_preprocessing"]
    assert pre["resampled_from"]["spacing"] == pytest.approx(list(SPACING[::-1]))
    assert pre["resampled_to"]["spacing"] == [2.0, 1.0, 1.0] and pre["folds"] == ([fold] if fold else ["0", "1"])
    assert (pre["mirroring"] is not None) == mirroring
    roles = [item["role"] for item in run["inputs"]]
    assert "nnU-Net plans" in roles and any(r.startswith("nnU-Net checkpoint") for r in roles)
    saliency = read_image(tmp_path / "run" / "attributions" / "Saliency.nii.gz")
    assert saliency.array.shape == ours.array.shape and np.abs(saliency.array).sum() > 0


def test_resampling_matrices_reproduce_nnunet_resampling():
    """The separable matrices (with scikit-image's clipping to the input range) give what nnU-Net's
    resample_data_or_seg_to_shape gives: cubic with a separate anisotropic axis, cubic, linear."""
    from functools import partial

    from nnunetv2.preprocessing.resampling.default_resampling import (determine_do_sep_z_and_axis,
                                                                      resample_data_or_seg_to_shape)

    from EsegetaLib.models.resampling import SeparableResample, axis_matrices

    rng = np.random.default_rng(1)
    data = rng.normal(size=(2, 18, 30, 36))
    for current, order in (((2.5, 0.9, 0.8), 3), ((1.2, 0.9, 0.8), 3), ((2.5, 0.9, 0.8), 1)):
        target, shape_out = (2.0, 1.0, 1.0), [22, 27, 29]
        function = partial(resample_data_or_seg_to_shape, is_seg=False, order=order, order_z=0, force_separate_z=None)
        expected = function(data, shape_out, current, target)
        from unittest import mock

        from nnunetv2.preprocessing.resampling import default_resampling

        with mock.patch.object(default_resampling, "resize", partial(default_resampling.resize, clip=False)):
            matrices = axis_matrices(lambda d, s: function(d, s, current, target), data.shape[1:], shape_out)
        separate, axis = determine_do_sep_z_and_axis(None, current, target)
        if separate:
            other = tuple(a + 1 for a in range(3) if a != axis)
            lower, upper = data.min(axis=other, keepdims=True), data.max(axis=other, keepdims=True)
            layer = SeparableResample(matrices, lower, upper, last_axis=int(axis))
        else:
            lower = data.min(axis=(1, 2, 3), keepdims=True)
            layer = SeparableResample(matrices, lower, data.max(axis=(1, 2, 3), keepdims=True))
        ours = layer(torch.from_numpy(data[None]))[0].numpy()
        np.testing.assert_allclose(ours, expected, atol=1e-10)


def test_saliency_through_resampling_is_the_gradient_of_the_pipeline(nnunet_root):
    """float64: the engine's Saliency on the input grid = d/dx of sum(region * logit_1) of the whole
    resampled pipeline, taken in one autograd graph; completeness of the map's geometry."""
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.options import EngineOptions, Target

    _, folder = nnunet_root
    model = load_model(folder, fold=0)
    volume = tube_volume(shape=(30, 26, 14))
    function = model.network_for(volume, SPACING).double()
    session = ExplainSession(volume, function, Target(class_index=1, region="predicted"),
                             EngineOptions(device="cpu", patch_size=volume.shape[1:], divisor=1),
                             spacing=SPACING)
    result = session.attribute("Saliency", {"absolute": False})
    x = torch.from_numpy(volume[None].astype(np.float64)).requires_grad_(True)
    region = torch.from_numpy(session.region)
    score = (function(x)[0, 1] * region).sum()
    (grad,) = torch.autograd.grad(score, x)
    assert result.map.shape == volume.shape[1:]
    err = float(np.abs(result.map - grad[0].sum(0).numpy()).max())
    print(f"\nSaliency vs one-graph gradient: max abs error {err:.2e} (max |grad| {float(grad.abs().max()):.3g})")
    assert err <= 1e-9 * max(1.0, float(grad.abs().max()))
    assert float(grad.abs().sum()) > 0 and session.region.any()


def test_fold_ensemble_is_the_mean_of_the_folds(nnunet_root):
    _, folder = nnunet_root
    volume = tube_volume(shape=(20, 20, 10))
    x = torch.from_numpy(volume[None])
    with torch.no_grad():
        both = load_model(folder).network_for(volume, SPACING)(x)
        each = [load_model(folder, fold=f).network_for(volume, SPACING)(x) for f in (0, 1)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-5)
    assert float((each[0] - each[1]).abs().max()) > 1e-3  # the folds differ


def test_every_method_runs_or_is_refused_with_a_reason(nnunet_root, volume_file):
    """Gradient and perturbation methods run through nnU-Net's pipeline; layer methods are refused
    in one line that says why (the layer runs once per nnU-Net patch on the resampled grid)."""
    from EsegetaLib.methods import all_methods
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.runner import ExplainRequest, prepare

    _, folder = nnunet_root
    cheap = {"IntegratedGradients": {"n_steps": 2}, "DeepLiftShap": {"n_baselines": 1},
             "GradientShap": {"n_samples": 1, "n_baselines": 1}, "SmoothGrad": {"nt_samples": 1},
             "SmoothGradSquared": {"nt_samples": 1}, "VarGrad": {"nt_samples": 2},
             "Occlusion": {"window_fraction": 0.5}, "FeatureAblation": {"block_fraction": 0.5},
             "ShapleyValueSampling": {"n_samples": 1, "block_fraction": 0.5},
             "Lime": {"n_samples": 8, "block_fraction": 0.5}, "KernelShap": {"n_samples": 8, "block_fraction": 0.5},
             "RISE": {"n_masks": 2}}
    ran, refused = [], []
    for spec in all_methods():
        request = ExplainRequest(volume=volume_file, model=folder, fold="0", methods=spec.name,
                                 params={spec.name: cheap.get(spec.name, {})}, metrics="none", scene=False,
                                 device="cpu", region="whole")
        try:
            prepared = prepare(request)
        except EsegetaError as exc:
            message = str(exc)
            assert "\n" not in message and "nnU-Net patch" in message, message
            refused.append(spec.name)
            continue
        image = prepared.image
        network = prepared.model.network_for(image.array, spacing=image.spacing, affine=image.ijk_to_ras)
        session = ExplainSession(image.array, network, prepared.target, prepared.options, spacing=image.spacing)
        result = session.attribute(spec.name, prepared.methods[0][1])
        assert result.map.shape == (36, 30, 18) and np.isfinite(result.map).all(), spec.name
        ran.append(spec.name)
    print(f"\nran on nnU-Net: {', '.join(ran)}\nrefused: {', '.join(refused)}")
    assert {"Saliency", "IntegratedGradients", "GuidedBackprop", "DeepLift", "Occlusion", "RISE"} <= set(ran)
    assert set(refused) == {s.name for s in all_methods() if s.needs_layer}


def test_residual_encoder_unet_folder_loads_and_runs(tmp_path):
    """ResidualEncoderUNet (nnU-Net ResEnc plans) is built by nnU-Net's trainer and runs."""
    folder = make_nnunet_folder(tmp_path, plans_dict=plans(architecture=RESENC, normalization="CTNormalization"))
    model = load_model(folder)
    assert type(model.network).__name__ == "ResidualEncoderUNet"
    assert "CTNormalization" in model.description.normalization
    volume = tube_volume(shape=(20, 20, 10))
    with torch.no_grad():
        out = model.network_for(volume, SPACING)(torch.from_numpy(volume[None]))
    assert out.shape == (1, 2, 20, 20, 10) and torch.isfinite(out).all()
    clipped = model.network_for(volume, SPACING).norm_record[0]
    assert clipped["clip"] == [60.0, 700.0] and clipped["offset"] == 300.0


def one_error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("esegeta: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_nnunet_inputs_get_one_line(nnunet_root, volume_file, tmp_path, capsys):
    import shutil

    _, folder = nnunet_root
    run = ["explain", volume_file, "--out", tmp_path / "out", "--device", "cpu", "--model"]
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(capsys, run + [empty])
    assert "neither an nnU-Net" in line and "plans.json" in line and "configs/inference.json" in line
    line = one_error_line(capsys, run + [folder, "--fold", "3"])
    assert "fold 3" in line and "0, 1" in line
    # A checkpoint that would need arbitrary code to unpickle (a pickled object of a class).
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    state = torch.load(bad / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state["trainer"] = torch.nn.Linear(1, 1)  # a whole module object: unpickling would import and run code
    torch.save(state, bad / "fold_0" / "checkpoint_final.pth")
    line = one_error_line(capsys, run + [bad, "--fold", "0"])
    assert "arbitrary code" in line
    assert not (tmp_path / "out").exists()


def test_study_files_take_nnunet_folders_fold_and_activation(nnunet_root, volume_file, tmp_path):
    """A study's model entry may be an nnU-Net folder with `fold` and an `activation` override; both
    reach the loaded model; a folder that is neither format, or `fold` elsewhere, is a problem."""
    from EsegetaLib.study.cases import _request, make_task
    from EsegetaLib.study.spec import StudySpecError, validate_study

    _, folder = nnunet_root
    data = {"volumes": [str(volume_file)], "methods": ["Saliency"], "metrics": "none",
            "models": [{"name": "nn", "path": str(folder), "fold": 1, "activation": "softmax"}]}
    spec = validate_study(data, str(tmp_path / "study.yaml"), tmp_path)
    assert spec.models[0].fold == "1" and spec.models[0].activation == "softmax"
    task = make_task(spec, spec.cases[0], tmp_path / "out")
    request = _request(task)
    assert request.fold == "1" and request.activation == "softmax"
    from EsegetaLib.runner import prepare

    prepared = prepare(request)
    assert prepared.model.folds == ["1"] and prepared.model.activation_source == "given"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = dict(data, models=[{"path": str(empty)}, {"name": "b", "path": "bundled", "fold": 0}])
    with pytest.raises(StudySpecError) as err:
        validate_study(bad, str(tmp_path / "study.yaml"), tmp_path)
    text = str(err.value)
    assert "neither an nnU-Net" in text and "fold" in text and "nnU-Net trained-model folders only" in text


def test_slicer_panel_logic_takes_folders_fold_and_activation(nnunet_root, tmp_path):
    """The Qt-free panel logic: an nnU-Net folder is summarised from its JSON files (no torch),
    fold and activation become request fields, mistakes are one line naming the control."""
    from EsegetaLib.runner import ExplainRequest
    from EsegetaLib.slicer.slicer_logic import PanelSettings, model_card_summary, request_fields

    _, folder = nnunet_root
    summary = model_card_summary(str(folder))
    assert summary["classes"] == ["background", "vessel"] and "fold_0, fold_1" in summary["text"]
    settings = PanelSettings(methods=["Saliency"], model_path=str(folder), fold="1", activation="softmax")
    fields = request_fields(settings)
    assert fields["fold"] == "1" and fields["activation"] == "softmax"
    ExplainRequest(volume="x.nii.gz", **fields)
    for bad, fragment in ((PanelSettings(methods=["Saliency"], model_path="bundled", fold="0"), "Fold applies"),
                          (PanelSettings(methods=["Saliency"], activation="relu"), "Activation must be"),
                          (PanelSettings(methods=["Saliency"], model_path=str(tmp_path)), "neither an nnU-Net")):
        with pytest.raises(EsegetaError, match=fragment) as err:
            request_fields(bad)
        assert "\n" not in str(err.value)


def test_transposed_ct_resenc_folder_equals_nnunet_predictor(tmp_path, capsys):
    """Axis handling and CT normalisation against nnU-Net's predictor: plans with transpose_forward
    [2, 0, 1] (nnU-Net puts the anisotropic axis first), CTNormalization (clip to the dataset's
    percentiles, its mean and std), a ResidualEncoderUNet; the volume's coarse axis is I."""
    from EsegetaLib.io import Image, read_image, write_image

    folder = make_nnunet_folder(tmp_path / "nn", plans_dict=plans(architecture=RESENC, normalization="CTNormalization",
                                                                  transpose=(2, 0, 1)), seed=3)
    array = tube_volume(shape=(14, 30, 34))
    volume = tmp_path / "ct_0000.nii.gz"
    write_image(volume, array, Image(array=array, ijk_to_ras=anisotropic_affine((2.6, 0.9, 0.8)), format="nifti"))
    out = tmp_path / "run"
    assert main(["explain", str(volume), "--model", str(folder), "--out", str(out), "--methods", "Saliency",
                 "--metrics", "none", "--no-scene", "--device", "cpu", "--region", "whole"]) == 0, \
        capsys.readouterr().err
    ours = read_image(out / "segmentation.nii.gz")
    reference = read_image(nnunet_prediction(folder, volume, tmp_path / "nnunet", (0,)))
    score = dice(ours.array[0], reference.array[0])
    print(f"\ntransposed CT ResEnc: Dice vs nnUNetPredictor {score:.4f}")
    assert ours.array.shape == reference.array.shape
    assert 100 < int((reference.array > 0).sum()) < reference.array.size - 100
    assert score >= 0.99
    run = json.loads((out / "run.json").read_text())
    assert run["engine"]["model_preprocessing"]["axis_order"] == ["I", "K", "J"]


def test_the_printed_window_is_the_models_with_its_input_grid_equivalent(tmp_path):
    """A transposed plan (nnU-Net axes = input I, K, J): the window is nnU-Net's patch at its
    spacing, and on the input grid each nnU-Net axis lands on the input axis it runs along."""
    folder = make_nnunet_folder(tmp_path / "nn", plans_dict=plans(transpose=(2, 0, 1)), seed=3)
    array = tube_volume(shape=(14, 30, 34))
    function = load_model(folder).network_for(array, (2.6, 0.9, 0.8))
    assert function.record["axis_order"] == ["I", "K", "J"]
    # patch (16, 32, 32) at (2, 1, 1) mm along I, K, J; on the input: 16*2/2.6, 32*1/0.9, 32*1/0.8
    assert function.window_text.startswith("16x32x32 voxels at 2x1x1 mm on the model's "
                                           f"{'x'.join(map(str, function.record['resampled_to']['shape']))} grid (")
    assert function.window_text.endswith("= 12.3x35.6x40 input voxels (I x J x K at 2.6x0.9x0.8 mm)")
