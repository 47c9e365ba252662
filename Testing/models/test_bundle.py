"""MONAI bundles made here (a small UNet; inference.json with Orientationd, Spacingd and
ScaleIntensityRanged; metadata with class names): Esegeta's segmentation equals MONAI's own bundle
inference (`monai.bundle.run`, its evaluator, Invertd and SaveImaged) on the same file; maps on the
input grid; bad bundles get one line."""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_helpers import dice, tube_volume  # noqa: E402

from EsegetaLib.cli import main  # noqa: E402
from EsegetaLib.models import load_model  # noqa: E402

NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
           "strides": [2, 2], "num_res_units": 1, "norm": "instance"}
ROI = [16, 16, 16]


def inference_config(spacing=(1.5, 1.5, 2.0), network=None):
    """An inference.json in the shape of MONAI's model-zoo bundles (spleen_ct_segmentation)."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cpu')",
        "network_def": network or NETWORK,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(spacing), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 150, "a_max": 450, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 2, "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "resample": False, "separate_folder": False, "squeeze_end_dims": True}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }


METADATA = {"version": "0.1.0", "monai_version": "1.6.1", "name": "Tiny vessel bundle",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1,
                                     "spatial_shape": ROI, "dtype": "float32"}},
                "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                     "spatial_shape": ROI, "dtype": "float32",
                                     "channel_def": {"0": "background", "1": "vessel"}}}}}


def make_bundle(folder: Path, config=None, seed: int = 0) -> Path:
    from monai.networks.nets import UNet

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(config or inference_config(), indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=2))
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in NETWORK.items() if k != "_target_"}
    net = UNet(**kwargs)
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


@pytest.fixture(scope="module")
def bundle_and_volume(tmp_path_factory):
    from EsegetaLib.io import Image, write_image

    root = tmp_path_factory.mktemp("bundle")
    bundle = make_bundle(root / "tiny_bundle")
    data = root / "data"
    data.mkdir()
    array = tube_volume(shape=(30, 28, 12))
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])  # one flipped axis: Orientationd has work to do
    affine[:3, 3] = [5.0, -3.0, 2.0]
    volume = data / "case.nii.gz"
    write_image(volume, array, Image(array=array, ijk_to_ras=affine, format="nifti"))
    return bundle, volume


def monai_bundle_prediction(bundle: Path, volume: Path, out: Path) -> Path:
    pytest.importorskip("ignite", reason="MONAI's bundle evaluator needs pytorch-ignite")
    from monai.bundle import run

    run(run_id="run", config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
        dataset_dir=str(volume.parent), output_dir=str(out))
    (found,) = list(out.glob("*.nii.gz"))
    return found


@pytest.mark.parametrize("as_zip", [False, True])
def test_segmentation_equals_monai_bundle_inference(bundle_and_volume, tmp_path, capsys, as_zip):
    from EsegetaLib.io import read_image

    bundle, volume = bundle_and_volume
    model = bundle
    if as_zip:
        model = tmp_path / "tiny_bundle.zip"
        with zipfile.ZipFile(model, "w") as archive:
            for file in bundle.rglob("*"):
                if file.is_file() and "eval" not in file.parts:
                    archive.write(file, Path("tiny_bundle") / file.relative_to(bundle))
    out = tmp_path / "run"
    code = main(["explain", str(volume), "--model", str(model), "--out", str(out), "--methods", "Saliency",
                 "--metrics", "none", "--no-scene", "--device", "cpu", "--region", "whole"])
    assert code == 0, capsys.readouterr().err
    assert "MONAI bundle" in capsys.readouterr().err
    ours = read_image(out / "segmentation.nii.gz")
    reference = read_image(monai_bundle_prediction(bundle, volume, tmp_path / "monai"))
    assert ours.array.shape == reference.array.shape == (1, 30, 28, 12)
    np.testing.assert_allclose(ours.ijk_to_ras, reference.ijk_to_ras, atol=1e-5)
    score = dice(ours.array[0], reference.array[0])
    agree = float((ours.array == reference.array).mean())
    print(f"\nbundle{' (zip)' if as_zip else ''}: Dice vs monai.bundle.run {score:.4f}, voxels equal {agree:.4f}")
    assert 100 < int((reference.array > 0).sum()) < reference.array.size - 100
    assert score >= 0.99
    saliency = read_image(out / "attributions" / "Saliency.nii.gz")
    assert saliency.array.shape == ours.array.shape and np.abs(saliency.array).sum() > 0
    np.testing.assert_allclose(saliency.ijk_to_ras, ours.ijk_to_ras)
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"]["model_description"]["classes"] == ["background", "vessel"]
    steps = [s["transform"] for s in run["engine"]["model_preprocessing"]["steps"]]
    assert steps == ["Orientationd", "Spacingd", "ScaleIntensityRanged"]


def test_saliency_is_the_gradient_on_the_input_grid(bundle_and_volume):
    """float64: the engine's Saliency = autograd gradient of the bundle pipeline w.r.t. the input."""
    from EsegetaLib.engine import ExplainSession
    from EsegetaLib.io import read_image
    from EsegetaLib.options import EngineOptions, Target

    bundle, volume = bundle_and_volume
    image = read_image(volume)
    function = load_model(bundle).network_for(image.array, image.spacing, image.ijk_to_ras).double()
    session = ExplainSession(image.array, function, Target(class_index=1, region="whole"),
                             EngineOptions(device="cpu", patch_size=image.spatial_shape, divisor=1),
                             spacing=image.spacing)
    result = session.attribute("Saliency", {"absolute": False})
    x = torch.from_numpy(image.array[None].astype(np.float64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(function(x)[0, 1].sum(), x)
    assert result.map.shape == image.spatial_shape
    np.testing.assert_allclose(result.map, grad[0].sum(0).numpy(), rtol=1e-9, atol=1e-12)
    assert float(grad.abs().sum()) > 0


def test_bad_bundles_get_one_line(bundle_and_volume, tmp_path, capsys):
    _, volume = bundle_and_volume
    bad_network = dict(NETWORK, channels="not a list")
    broken = make_bundle(tmp_path / "broken", config=inference_config(network=bad_network))
    code = main(["explain", str(volume), "--model", str(broken), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("esegeta: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "network cannot be built from 'network_def'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_explain_prints_the_bundles_window_and_its_input_grid_equivalent(bundle_and_volume, tmp_path, capsys):
    """The window reported is the bundle's (its inferer's roi at Spacingd's pixdim), with what it
    covers in the input's voxels, not the engine's one pass over the whole volume."""
    bundle, volume = bundle_and_volume
    code = main(["explain", str(volume), "--model", str(bundle), "--out", str(tmp_path / "run"), "--methods",
                 "Saliency", "--metrics", "none", "--no-scene", "--device", "cpu", "--region", "whole"])
    err = capsys.readouterr().err
    assert code == 0, err
    # 16^3 at 1.5 x 1.5 x 2 mm = 30 x 26.7 x 12.8 voxels of 0.8 x 0.9 x 2.5 mm
    assert "Segmenting: the model's window 16x16x16 voxels at 1.5x1.5x2 mm on the model's " in err, err
    assert "= 30x26.7x12.8 input voxels (I x J x K at 0.8x0.9x2.5 mm); one pass over the whole 30x28x12 input" in err
