"""A real nnU-Net v2 trained-model folder, made with nnU-Net's own trainer class.

Plans and dataset JSON are written with nnU-Net's `save_json` as `nnUNetTrainer.on_train_start`
writes them; the network (`PlainConvUNet` or `ResidualEncoderUNet`, tiny) is built by
`nnUNetTrainer.initialize()` from the plans, seeded, and saved by `nnUNetTrainer.save_checkpoint`
with NumPy scalars in its training log, as a trained checkpoint has them.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

DATASET = "Dataset901_Tiny"
PLAIN = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
         "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16],
                         "conv_op": "torch.nn.modules.conv.Conv3d",
                         "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                         "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                         "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                         "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                         "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                         "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                         "nonlin_kwargs": {"inplace": True}},
         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
RESENC = copy.deepcopy(PLAIN)
RESENC["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
RESENC["arch_kwargs"]["n_blocks_per_stage"] = RESENC["arch_kwargs"].pop("n_conv_per_stage")
RESENC["arch_kwargs"]["n_blocks_per_stage"] = [1, 1, 1]


def plans(architecture=PLAIN, normalization="ZScoreNormalization", spacing=(2.0, 1.0, 1.0),
          patch=(16, 32, 32), transpose=(0, 1, 2)):
    """plans.json content with every key nnU-Net's ExperimentPlanner writes (3d_fullres only)."""
    backward = [int(i) for i in np.argsort(transpose)]
    return {
        "dataset_name": DATASET, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [20, 40, 40],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose), "transpose_backward": backward,
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [20.0, 40.0, 40.0],
            "spacing": list(spacing), "normalization_schemes": [normalization], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": copy.deepcopy(architecture), "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 900.0, "mean": 300.0, "median": 280.0, "min": 20.0, "percentile_00_5": 60.0,
            "percentile_99_5": 700.0, "std": 120.0}},
    }


DATASET_JSON = {"channel_names": {"0": "MRA"}, "labels": {"background": 0, "vessel": 1}, "numTraining": 2,
                "file_ending": ".nii.gz"}


def make_nnunet_folder(root: Path, plans_dict=None, folds=(0,), seed: int = 0) -> Path:
    """nnUNet_results/Dataset901_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres with fold_N checkpoints."""
    import torch

    pytest.importorskip("nnunetv2", reason="nnU-Net tests need the nnunet extra (pip install 'esegeta[nnunet]')")
    mp = pytest.MonkeyPatch()
    mp.setenv("nnUNet_results", str(root / "results"))
    mp.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    mp.setenv("nnUNet_raw", str(root / "raw"))
    try:
        from batchgenerators.utilities.file_and_folder_operations import join, save_json
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        # initialize() infers the dataset class from the preprocessed folder's file type; there is no
        # training data here, so one empty file of nnU-Net's default (blosc2) type stands for it.
        pre = root / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
        pre.mkdir(parents=True, exist_ok=True)
        (pre / "case.b2nd").touch()
        folder = None
        for i, fold in enumerate(folds):
            p = copy.deepcopy(plans_dict or plans())
            p["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
            torch.manual_seed(seed + i)
            trainer = nnUNetTrainer(p, "3d_fullres", fold, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
            trainer.initialize()
            with torch.no_grad():  # seeded weights with a visible foreground on the test volume
                for name, param in trainer.network.named_parameters():
                    if name.endswith("bias"):
                        param.normal_(0.0, 0.1)
            for epoch in range(2):  # the training log holds NumPy scalars, as after real epochs
                trainer.logger.log("mean_fg_dice", np.float64(0.5 + 0.1 * epoch), epoch)
                trainer.logger.log("dice_per_class_or_region", [np.float64(0.5)], epoch)
                trainer.logger.log("train_losses", np.float32(-0.2), epoch)
                trainer.logger.log("val_losses", np.float32(-0.1), epoch)
                trainer.logger.log("lrs", 0.01, epoch)
                trainer.logger.log("epoch_start_timestamps", 1.0e9 + epoch, epoch)
                trainer.logger.log("epoch_end_timestamps", 1.0e9 + epoch + 0.5, epoch)
            trainer._best_ema = np.float64(0.5)
            # what training sets before its first epoch: the axes allowed for test-time mirroring
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            save_json(trainer.plans_manager.plans, join(trainer.output_folder_base, "plans.json"), sort_keys=False)
            save_json(trainer.dataset_json, join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
            trainer.save_checkpoint(join(trainer.output_folder, "checkpoint_final.pth"))
            folder = Path(trainer.output_folder_base)
        return folder
    finally:
        mp.undo()


def tube_volume(shape=(36, 30, 18), seed: int = 0) -> np.ndarray:
    """(1, I, J, K) float32: a bright tube over a textured background."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    tube = np.exp(-((j - shape[1] / 2) ** 2 + (k - shape[2] / 2) ** 2) / 8.0)
    return (100 + 400 * tube + 40 * rng.standard_normal(shape))[None].astype(np.float32)


def anisotropic_affine(spacing=(0.8, 0.9, 2.5)) -> np.ndarray:
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-like file, as scanners write
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return affine


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
