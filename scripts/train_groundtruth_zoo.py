#!/usr/bin/env python3
"""Train the ground-truth benchmark's model zoo: small MONAI networks on `EsegetaLib.groundtruth`
volumes, each also saved with random weights (the randomisation control).

Networks (minimal sizes, CPU minutes each): UNet (InstanceNorm with running statistics + PReLU),
DynUNet with deep supervision (the paper's "UNet MSS" analogue; the deep-supervision heads are used
in training and dropped by MONAI in eval), SegResNet (GroupNorm) and AttentionUnet. Each is trained
with Dice + cross-entropy for a fixed time budget on generated volumes (seeds 0-23), then scored on
held-out seeds 100-103: Dice, and for the shortcut design the share of predicted vessel voxels that
disappear when the markers are removed (the proof that the model uses the cue); for the contrast
design the same volumes with every shell moved to the other side of its tube's level: the share of
predicted vessel that disappears and the Dice against the flipped labels (the formerly darker
tubes), which a model that reads the tube-versus-shell contrast follows.

    python scripts/train_groundtruth_zoo.py --design shortcut --seconds 240 --out examples/groundtruth/zoo
    python scripts/train_groundtruth_zoo.py --design contrast --models DynUNet --seconds 600
    python scripts/train_groundtruth_zoo.py --models UNet --seconds 10 --out /tmp/zoo   # smoke test

Writes `<out>/<design>_<model>.json|.pt` (trained) and `<out>/<design>_<model>_random.json|.pt`
(model cards read by `esegeta explain --model CARD`), and `<out>/<design>_zoo.json` (the figures).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from EsegetaLib.groundtruth import make_case  # noqa: E402
from EsegetaLib.models import ModelCard, make_normalization  # noqa: E402

NORMALIZATION = {"type": "percentile", "lower": 1.0, "upper": 99.9, "clip": False}
INSTANCE = ["instance", {"track_running_stats": True}]
ZOO = {
    "UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32, 64],
             "strides": [2, 2, 2], "num_res_units": 1, "act": "prelu", "norm": INSTANCE},
    "DynUNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size": [3, 3, 3, 3],
                "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2], "filters": [8, 16, 32, 64],
                "norm_name": INSTANCE, "deep_supervision": True, "deep_supr_num": 2},
    "SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8,
                  "blocks_down": [1, 2, 2], "blocks_up": [1, 1]},
    "AttentionUnet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32, 64],
                      "strides": [2, 2, 2]},
}
TRAIN_SEEDS = range(0, 24)
HELDOUT_SEEDS = range(100, 104)


def normalized(volume: np.ndarray) -> np.ndarray:
    layer = make_normalization(volume[None], NORMALIZATION)
    with torch.no_grad():
        return layer(torch.from_numpy(volume[None][None]))[0].numpy()


def build(name: str):
    from monai.networks import nets

    return getattr(nets, name)(**ZOO[name])


def predict(net, volume: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = net(torch.from_numpy(normalized(volume))[None])
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out.argmax(1)[0].numpy().astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def train(name: str, design: str, seconds: float, seed: int):
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    net = build(name)
    cases = [make_case(design, s) for s in TRAIN_SEEDS]
    xs = torch.stack([torch.from_numpy(normalized(c.image)) for c in cases])
    ys = torch.stack([torch.from_numpy(c.labels.astype(np.int64))[None] for c in cases])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    net.train()
    started, iterations, losses = time.perf_counter(), 0, []
    while time.perf_counter() - started < seconds:
        # Cosine decay over the time budget: the end of a short run settles instead of jumping.
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + np.cos(np.pi * min(1.0, (time.perf_counter() - started) / seconds)))
        idx = rng.choice(len(cases), size=2, replace=False)
        x, y = xs[idx], ys[idx]
        flips = [d for d in (2, 3, 4) if rng.random() < 0.5]  # the rules are flip-invariant
        if flips:
            x, y = x.flip(flips), y.flip(flips)
        out = net(x)
        if out.dim() == 6:  # DynUNet deep supervision: (B, heads, C, *S), heads at full resolution
            weights = [0.5 ** k for k in range(out.shape[1])]
            loss = sum(w * loss_fn(out[:, k], y) for k, w in enumerate(weights)) / sum(weights)
        else:
            loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        iterations += 1
    net.eval()
    return net, {"iterations": iterations, "seconds": round(time.perf_counter() - started, 1),
                 "final_loss": round(float(np.mean(losses[-20:])), 4)}


def evaluate(net, design: str) -> dict:
    scores, lost, flip_lost, flip_dice = {}, {}, {}, {}
    for s in HELDOUT_SEEDS:
        case = make_case(design, s)
        pred = predict(net, case.image)
        scores[f"seed{s}"] = round(dice(pred, case.labels.astype(bool)), 4)
        if case.without_cue is not None:  # how much of the predicted vessel vanishes without markers
            plain = predict(net, case.without_cue)
            lost[f"seed{s}"] = round(1.0 - plain.sum() / max(1, pred.sum()), 4)
        if case.contrast_flipped is not None:  # shells flipped: the vessels the model still finds
            flipped = predict(net, case.contrast_flipped)
            flip_lost[f"seed{s}"] = round(1.0 - (flipped & pred).sum() / max(1, pred.sum()), 4)
            flip_dice[f"seed{s}"] = round(dice(flipped, case.flipped_labels.astype(bool)), 4)
    out = {"dice_heldout": scores, "dice_heldout_mean": _mean(scores)}
    if lost:
        out["predicted_lost_without_cue"] = lost
        out["predicted_lost_without_cue_mean"] = _mean(lost)
    if flip_lost:
        out["predicted_lost_contrast_flipped"] = flip_lost
        out["predicted_lost_contrast_flipped_mean"] = _mean(flip_lost)
        out["dice_flipped_labels"] = flip_dice
        out["dice_flipped_labels_mean"] = _mean(flip_dice)
    return out


def _mean(values: dict) -> float:
    return round(float(np.mean(list(values.values()))), 4)


def save(net, name: str, design: str, out: Path, metrics: dict, training: dict, random: bool) -> Path:
    stem = f"{design}_{name}" + ("_random" if random else "")
    torch.save(net.state_dict(), out / f"{stem}.pt")
    card = ModelCard(name=stem, architecture=name, weights=f"{stem}.pt", arguments=ZOO[name], in_channels=1,
                     classes=["background", "vessel"], activation="softmax", head=0,
                     normalization=NORMALIZATION, patch_size=[48, 48, 48], divisor=8, spacing=[0.5, 0.5, 0.5],
                     description=(f"Ground-truth benchmark ({design} design) {name}"
                                  + (" with random weights (randomisation control)." if random else
                                     ", trained on EsegetaLib.groundtruth volumes; not a clinical model.")),
                     metrics=metrics, training=training)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(card.__dict__, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--design", default="shortcut", choices=["shortcut", "contrast"])
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--seconds", type=float, default=240.0, help="training time per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "examples" / "groundtruth" / "zoo"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / f"{args.design}_zoo.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for name in args.models.split(","):
        torch.manual_seed(args.seed + 1)
        random_net = build(name).eval()
        random_metrics = evaluate(random_net, args.design)
        save(random_net, name, args.design, out, random_metrics, {"random_init_seed": args.seed + 1}, True)
        net, training = train(name, args.design, args.seconds, args.seed)
        training.update({"script": "scripts/train_groundtruth_zoo.py", "threads": args.threads,
                         "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop - 1], "torch": torch.__version__})
        metrics = evaluate(net, args.design)
        save(net, name, args.design, out, metrics, training, False)
        summary[name] = {"trained": metrics, "random": random_metrics, "training": training}
        print(json.dumps({name: summary[name]}, indent=None), flush=True)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
