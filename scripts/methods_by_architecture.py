"""Every registered method on the MONAI architectures users bring, at minimal sizes, in each model format:
ran, or refused with the one-line reason; and Integrated Gradients' steps and completeness per target
kind (point, ROI, predicted, whole) on random and briefly trained weights.  Writes a markdown table
(docs/readme/architectures.md by default) with the command and date it was made with.

    nice -n 15 python scripts/methods_by_architecture.py > /tmp/arch.log 2>&1
    python scripts/methods_by_architecture.py --architectures UNet,DynUNet --methods Saliency,GradCAM \\
        --formats eager --no-ig --out /tmp/slice.md

An architecture is built at the smallest size its MONAI class allows (16^3 windows; BasicUNet 16x16x32
and SwinUNETR 32x32x64: their deepest InstanceNorm needs more than one voxel),
saved as TorchScript (`torch.jit.trace`) and as a `torch.export` program (.pt2, dynamic batch), and
loaded back through `EsegetaLib.models.load_model`, the path a user's file takes.  Each method runs
through `EsegetaLib.api.explain` with its default parameters on one target (the predicted region of
class 1, or class 0 where a random net predicts no foreground).  An `EsegetaError` is a refusal (its
line is the reason shown); anything else is an error with its traceback in the log, and the table
says "error" (the CI slice, Testing/methods/test_methods_by_architecture.py, fails on it).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from EsegetaLib.errors import EsegetaError  # noqa: E402
from EsegetaLib.options import EngineOptions, Target  # noqa: E402

FORMATS = ("eager", "torchscript", "pt2")
TARGET_KINDS = ("point", "roi", "predicted", "whole")
DEFAULT_OUT = REPO / "docs" / "readme" / "architectures.md"
TRAIN_STEPS = 40


@dataclass
class Arch:
    """A MONAI architecture at its smallest workable size: `build()` -> network (eval), the volume's
    (= the window's) shape, the engine's size divisor."""
    name: str
    build: Callable[[], torch.nn.Module]
    shape: Tuple[int, int, int]
    divisor: int


def _monai():
    from monai.networks import nets
    return nets


ARCHITECTURES: Dict[str, Arch] = {a.name: a for a in [
    Arch("UNet", lambda: _monai().UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
                                        norm="instance", act="prelu"), (16, 16, 16), 4),
    Arch("DynUNet", lambda: _monai().DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                              upsample_kernel_size=[2, 2], filters=[4, 8, 16],
                                              norm_name="instance"), (16, 16, 16), 4),
    Arch("SegResNet", lambda: _monai().SegResNet(3, init_filters=8, in_channels=1, out_channels=2,
                                                  blocks_down=(1, 2), blocks_up=(1,)), (16, 16, 16), 4),
    Arch("SegResNetDS", lambda: _monai().SegResNetDS(3, init_filters=8, in_channels=1, out_channels=2,
                                                      blocks_down=(1, 2, 2), dsdepth=2), (16, 16, 16), 4),
    # four poolings: at 16^3 the bottom InstanceNorm would see one voxel (torch refuses); 16x16x32 gives it 2
    Arch("BasicUNet", lambda: _monai().BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), (16, 16, 32), 16),
    Arch("AttentionUnet", lambda: _monai().AttentionUnet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2)),
         (16, 16, 16), 4),
    Arch("UNETR", lambda: _monai().UNETR(1, 2, img_size=16, feature_size=4, hidden_size=24, mlp_dim=48,
                                          num_heads=2), (16, 16, 16), 16),
    Arch("SwinUNETR", lambda: _monai().SwinUNETR(in_channels=1, out_channels=2, feature_size=12,
                                                  depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), (32, 32, 64), 32),
]}


def build(name: str, seed: int = 0) -> Tuple[torch.nn.Module, Arch]:
    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    return arch.build().eval(), arch


def volume(shape: Sequence[int], seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A synthetic TOF-like volume (EsegetaLib.sample), z-scored, and its vessel labels: (I,J,K) float32, uint8."""
    from EsegetaLib.sample import generate_tof_like

    image, labels = generate_tof_like(shape=tuple(shape), spacing=(0.5, 0.5, 0.5), seed=seed, n_roots=2,
                                      root_radius_mm=1.0, blobs=1)
    array = np.asarray(image.array[0], np.float32)
    return ((array - array.mean()) / (array.std() + 1e-6)).astype(np.float32), labels


def train_briefly(net: torch.nn.Module, arch: Arch, steps: int, seed: int = 0) -> torch.nn.Module:
    """`steps` Adam steps (lr 1e-2, cross-entropy) on synthetic vessel volumes: a briefly trained net
    whose predicted region is the vessels, not noise.  Deep-supervision lists: the first head."""
    if steps <= 0:
        return net
    data = [volume(arch.shape, seed=100 + k) for k in range(4)]
    x = torch.from_numpy(np.stack([d[0] for d in data]))[:, None]
    y = torch.from_numpy(np.stack([d[1] for d in data])).long()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(steps):
        k = step % len(data)
        out = net(x[k:k + 1])
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = torch.nn.functional.cross_entropy(out, y[k:k + 1], weight=torch.tensor([1.0, 4.0]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


def as_format(net: torch.nn.Module, arch: Arch, fmt: str, folder: Path) -> torch.nn.Module:
    """The network as a user's file of `fmt` gives it (saved, then loaded by EsegetaLib.models);
    an EsegetaError when the format cannot be made (its first line says why)."""
    if fmt == "eager":
        return net
    from EsegetaLib.models import load_model

    example = torch.randn(1, 1, *arch.shape)
    path = folder / f"{arch.name}.{'pt' if fmt == 'torchscript' else 'pt2'}"
    try:
        if fmt == "torchscript":
            with torch.no_grad():
                torch.jit.trace(net, example, check_trace=False).save(str(path))
        else:
            batch = torch.export.Dim("batch", min=1, max=64)
            try:
                program = torch.export.export(net, (torch.randn(2, 1, *arch.shape),),
                                              dynamic_shapes=({0: batch},))
            except Exception:  # some graphs specialise the batch: a static batch of 1 still runs
                program = torch.export.export(net, (example,))
            torch.export.save(program, str(path))
    except Exception as error:  # the export itself failed: a fact about the architecture, stated in the table
        raise EsegetaError(f"{fmt} export failed: {_first_line(error)}") from None
    return load_model(str(path)).network


def _first_line(error) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:500]


@dataclass
class Cell:
    status: str  # ran | refused | error
    reason: str = ""
    seconds: float = 0.0
    checks: Dict[str, str] = field(default_factory=dict)  # trust check name -> status
    completeness: Optional[float] = None  # the completeness check's value (for not_run: the bypassing share)
    steps: Optional[float] = None  # path methods: gradient evaluations per window
    baseline: str = ""


def _centre_cube(shape: Sequence[int]) -> np.ndarray:
    """A cube of half the shortest edge at the centre (bool (I,J,K))."""
    half = min(shape) // 4
    mask = np.zeros(tuple(shape), bool)
    mask[tuple(slice(n // 2 - half, n // 2 + half) for n in shape)] = True
    return mask


def _target(network, vol: np.ndarray, options: EngineOptions) -> Target:
    """The table's target: class 1 in a central ROI cube of half the shortest edge (perturbation
    methods stay in its bounding box, so their cost does not grow with a random net's predicted
    region)."""
    return Target(region="roi", class_index=1, mask=_centre_cube(vol.shape))


def run_method(network, vol: np.ndarray, method: str, options: EngineOptions, target: Target,
               log=print) -> Cell:
    """One method through `explain`: ran (with its trust statuses), refused (EsegetaError) or error."""
    from EsegetaLib.api import explain

    started = time.perf_counter()
    try:
        expl = explain(vol, network, [method], target=target, options=options)
    except EsegetaError as error:
        reason = str(error)
        if reason.startswith(method + " "):
            reason = "the method" + reason[len(method):]  # one footnote for the methods a reason shares
        return Cell("refused", _first_line(reason), time.perf_counter() - started)
    except Exception as error:  # a crash: the table must show it, the log keeps the traceback
        log(f"ERROR {method}: {type(error).__name__}: {_first_line(error)}\n{traceback.format_exc()}")
        return Cell("error", f"{type(error).__name__}: {_first_line(error)}", time.perf_counter() - started)
    result = next(iter(expl.results.values()))
    checks = {c.name: c.status for c in result.checks if c.name != "determinism"}
    completeness = next((c.value for c in result.checks if c.name == "completeness"), None)
    steps = result.diagnostics.get("steps_used_mean")
    baseline = str(result.params.get("baseline", "")) if "baseline" in checks else ""
    return Cell("ran", "", time.perf_counter() - started, checks, completeness,
                None if steps is None else float(steps), baseline)


def ig_targets(vol: np.ndarray, labels_predicted: Optional[np.ndarray]) -> Dict[str, Target]:
    """One target of each kind: a ball of radius 2 at the centre, a cube ROI around it, the predicted
    region (class 1, else class 0), the whole volume."""
    centre = tuple(n // 2 for n in vol.shape)
    predicted_class = 1 if labels_predicted is not None and (labels_predicted == 1).any() else 0
    return {"point": Target(region="point", point=centre, radius=2), "roi": Target(region="roi", mask=_centre_cube(vol.shape)),
            "predicted": Target(region="predicted", class_index=predicted_class), "whole": Target(region="whole")}


@dataclass
class IGCase:
    arch: str
    weights: str
    kind: str
    status: str  # pass | refused | warn | error
    steps: Optional[float] = None
    completeness: Optional[float] = None
    baseline: str = ""
    reason: str = ""


def ig_case(network, vol: np.ndarray, target: Target, options: EngineOptions) -> Tuple[str, dict]:
    """IntegratedGradients with default settings on one target: (status, facts)."""
    from EsegetaLib.engine import ExplainSession

    session = ExplainSession(vol, network, target, options)
    if session.region_voxels == 0:
        return "refused", {"reason": "the target region is empty"}
    try:
        result = session.attribute("IntegratedGradients")
    except EsegetaError as error:
        return "refused", {"reason": _first_line(error)}
    d = result.diagnostics
    check = {c.name: c for c in result.checks}["completeness"]
    return check.status, {"steps": d.get("steps_used_mean"), "completeness": d.get("relative_convergence_delta"),
                          "baseline": result.params.get("baseline", "")}


def markdown(cells: Dict[Tuple[str, str, str], Cell], methods: Sequence[str], archs: Sequence[str],
             formats: Sequence[str], ig: List[IGCase], commands: Sequence[str], seconds: float) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Methods by architecture",
        "",
        f"Generated by {' and '.join(f'`{c}`' for c in commands)} on {today} ({seconds / 60:.0f} min on "
        f"a shared 2-core CPU, torch {torch.__version__}).  Do not edit by hand: rerun the script.",
        "",
        "Every registered method with its default parameters, through `EsegetaLib.api.explain`, on MONAI "
        "architectures at minimal sizes (random weights, seed 0; 16^3 volumes, BasicUNet 16x16x32 and SwinUNETR "
        "32x32x64: their deepest InstanceNorm needs more than one voxel), in three "
        "formats: the eager module, TorchScript (`torch.jit.trace`, loaded back by `load_model`) and a "
        "`torch.export` program (`.pt2`, dynamic batch where the graph allows, loaded back by `load_model`); "
        "target: class 1 in a central ROI cube of half the shortest edge.  "
        "**ran** = the map was made (trust checks other than `pass` are named; path methods and DeepLift give "
        "their completeness error, steps per window and a baseline other than blur; 'completeness undefined' "
        "gives the share of the input gradient that bypasses LayerConductance's layer); **refused** = a one-line "
        "`EsegetaError` before or instead of a map (the reasons are listed below the table); **error** = a "
        "crash (a defect).",
        "",
    ]
    reasons: Dict[str, int] = {}
    archs = [a for a in archs if any(k[0] == a for k in cells)]  # columns: architectures with cells

    def cell_text(cell: Cell) -> str:
        if cell.status == "ran":
            odd = [f"{k} {v}" for k, v in sorted(cell.checks.items()) if v not in ("pass",) and k != "completeness"]
            status = cell.checks.get("completeness")
            if status == "not_run":
                odd.insert(0, "completeness undefined" + (
                    f": {100 * cell.completeness:.0f} % of the gradient bypasses the layer" if cell.completeness else ""))
            elif status is not None and cell.completeness is not None:
                odd.insert(0, f"completeness {100 * cell.completeness:.2g} %" + (" **" + status + "**" if status != "pass"
                                                                              else "") +
                           (f", {cell.steps:.0f} steps" if cell.steps else "") +
                           (f", {cell.baseline} baseline" if cell.baseline and cell.baseline != "blur" else ""))
            return "ran" + (f" ({'; '.join(odd)})" if odd else "")
        if cell.status == "refused":
            number = reasons.setdefault(cell.reason, len(reasons) + 1)  # (method names taken out by `run`)
            return f"refused [{number}]"
        return f"**error**: {cell.reason}"

    for fmt in formats:
        lines += [f"## {fmt}", "", "| method | " + " | ".join(archs) + " |",
                  "| --- | " + " | ".join("---" for _ in archs) + " |"]
        for method in methods:
            row = [cell_text(cells[(a, fmt, method)]) if (a, fmt, method) in cells else "" for a in archs]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
    if reasons:
        lines += ["## Refusal reasons", ""]
        lines += [f"{n}. {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: kv[1])]
        lines.append("")
    missing = [a for a in dict.fromkeys(c.arch for c in ig) if a not in {k[0] for k in cells}]
    if missing:
        lines += [f"Not in the tables above (their run did not finish in time; IG section only): {', '.join(missing)}.", ""]
    if ig:
        lines += ["## Integrated Gradients per target kind (default settings)", "",
                  "Adaptive IG (tolerance 1 %, at most 512 steps per window, blur baseline with the fallback "
                  "order blur, constant_low, mean, noise; a baseline other than blur is named).  steps = gradient "
                  "evaluations per window; completeness = |sum(map) - (F(x) - F(baseline))| / |F(x) - F(baseline)|.  "
                  "Eager models; point = ball of radius 2 at the centre, roi = the central cube, predicted = the "
                  "net's class-1 voxels (class 0 where it predicts none), whole = every voxel; random = seed 0, "
                  f"trained = {TRAIN_STEPS} Adam steps (lr 1e-2, weighted cross-entropy) on 4 synthetic vessel volumes.", "",
                  "| architecture | weights | " + " | ".join(TARGET_KINDS) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in TARGET_KINDS) + " |"]
        keyed = {(c.arch, c.weights, c.kind): c for c in ig}
        for arch in dict.fromkeys(c.arch for c in ig):
            for weights in dict.fromkeys(c.weights for c in ig if c.arch == arch):
                row = []
                for kind in TARGET_KINDS:
                    c = keyed.get((arch, weights, kind))
                    if c is None:
                        row.append("")
                    elif c.status in ("refused", "error"):
                        number = reasons.setdefault(c.reason, len(reasons) + 1)
                        row.append(f"{c.status} [{number}]")
                    else:
                        text = f"{c.steps:.0f} steps, {100 * c.completeness:.2g} %"
                        if c.baseline and c.baseline != "blur":
                            text += f" ({c.baseline})"
                        row.append(text if c.status == "pass" else f"{text} **{c.status}**")
                lines.append(f"| {arch} | {weights} | " + " | ".join(row) + " |")
        lines.append("")
        extra = [(r, n) for r, n in sorted(reasons.items(), key=lambda kv: kv[1])
                 if any(c.reason == r for c in ig)]
        if extra:
            lines += ["Reasons: " + "; ".join(f"[{n}] {r}" for r, n in extra), ""]
    return "\n".join(lines)


def run(archs: Sequence[str], methods: Sequence[str], formats: Sequence[str], ig_weights: Sequence[str],
        train_steps: int, log=print, ig_archs: Optional[Sequence[str]] = None
        ) -> Tuple[Dict[Tuple[str, str, str], Cell], List[IGCase]]:
    """The table's cells {(architecture, format, method): Cell} and the IG cases."""
    cells: Dict[Tuple[str, str, str], Cell] = {}
    ig: List[IGCase] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in archs:
            net, arch = build(name)
            vol, _ = volume(arch.shape)
            options = EngineOptions(device="cpu", divisor=arch.divisor, patch_size=tuple(arch.shape), precision="fp32")
            for fmt in formats:
                try:
                    network = as_format(net, arch, fmt, Path(tmp))
                    target = _target(network, vol, options)
                except EsegetaError as error:
                    for method in methods:
                        cells[(name, fmt, method)] = Cell("refused", _first_line(error))
                    log(f"{name} {fmt}: {error}")
                    continue
                except Exception as error:  # the model cannot even segment: every cell is an error
                    log(f"ERROR {name} {fmt}: {traceback.format_exc()}")
                    for method in methods:
                        cells[(name, fmt, method)] = Cell("error", f"{type(error).__name__}: {_first_line(error)}")
                    continue
                for method in methods:
                    cell = run_method(network, vol, method, options, target, log)
                    cells[(name, fmt, method)] = cell
                    log(f"{name:13s} {fmt:11s} {method:28s} {cell.status:8s} {cell.seconds:6.1f} s "
                        f"{cell.reason or cell.checks}")
            for weights in (ig_weights if ig_archs is None or name in ig_archs else ()):
                model = net if weights == "random" else train_briefly(build(name)[0], arch, train_steps)
                from EsegetaLib.engine import ExplainSession

                predicted = ExplainSession(vol, model, Target(region="predicted"), options).segmentation
                for kind, target in ig_targets(vol, predicted).items():
                    started = time.perf_counter()
                    try:
                        status, facts = ig_case(model, vol, target, options)
                    except Exception as error:
                        log(f"ERROR IG {name} {weights} {kind}: {traceback.format_exc()}")
                        status, facts = "error", {"reason": f"{type(error).__name__}: {_first_line(error)}"}
                    case = IGCase(name, weights, kind, status, **facts)
                    ig.append(case)
                    log(f"IG {name:13s} {weights:8s} {kind:9s} {status:8s} steps {case.steps} completeness "
                        f"{case.completeness} baseline {case.baseline} {case.reason} "
                        f"({time.perf_counter() - started:.1f} s)")
    return cells, ig


def main(argv=None) -> int:
    from EsegetaLib.methods import all_methods

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--methods", default="all", help="comma-separated names, or 'all' (every registered method)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--ig-weights", default="random,trained",
                        help="IG per target kind on these weights (random, trained); empty: none")
    parser.add_argument("--no-ig", action="store_true", help="skip the IG section")
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS, help="Adam steps of the briefly trained nets")
    parser.add_argument("--ig-architectures", default="",
                        help="architectures of the IG section (default: those of --architectures)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--json", default="", help="also save the raw results here (for --from-json)")
    parser.add_argument("--from-json", default="",
                        help="comma-separated result files of earlier runs: write the table from them, run nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        return _from_json([Path(p) for p in args.from_json.split(",") if p], Path(args.out))
    archs = [a for a in args.architectures.split(",") if a]
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        print(f"unknown architecture(s) {', '.join(unknown)}; known: {', '.join(ARCHITECTURES)}", file=sys.stderr)
        return 2
    methods = [s.name for s in all_methods()] if args.methods == "all" else [m for m in args.methods.split(",") if m]
    formats = [f for f in args.formats.split(",") if f]
    weights = [] if args.no_ig else [w for w in args.ig_weights.split(",") if w]
    ig_archs = [a for a in args.ig_architectures.split(",") if a] or archs
    started = time.perf_counter()
    cells, ig = run(archs, methods, formats, weights, args.train_steps,
                    log=lambda *a: print(*a, flush=True), ig_archs=ig_archs)
    command = "python scripts/methods_by_architecture.py " + " ".join(argv if argv is not None else sys.argv[1:])
    seconds = time.perf_counter() - started
    text = markdown(cells, methods, archs, formats, ig, [command.strip()], seconds)
    Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": command.strip(), "seconds": seconds, "methods": methods, "architectures": archs,
            "formats": formats, "cells": [[a, f, m, dataclasses.asdict(c)] for (a, f, m), c in cells.items()],
            "ig": [dataclasses.asdict(c) for c in ig]}))
    errors = [k for k, c in cells.items() if c.status == "error"] + [c for c in ig if c.status == "error"]
    print(f"wrote {args.out}: {len(cells)} cells, {len(ig)} IG cases, {len(errors)} error(s)")
    return 1 if errors else 0


def _from_json(paths: Sequence[Path], out: Path) -> int:
    """The table from saved runs (e.g. the small architectures in one run, SwinUNETR in another)."""
    cells, ig, methods, archs, formats, commands, seconds = {}, [], [], [], [], [], 0.0
    for path in paths:
        data = json.loads(path.read_text())
        cells.update({(a, f, m): Cell(**c) for a, f, m, c in data["cells"]})
        ig += [IGCase(**c) for c in data["ig"]]
        methods += [m for m in data["methods"] if m not in methods]
        archs += [a for a in data["architectures"] if a not in archs]
        formats += [f for f in data["formats"] if f not in formats]
        commands.append(data["command"])
        seconds += float(data["seconds"])
    out.write_text(markdown(cells, methods, archs, formats, ig, commands, seconds) + "\n")
    print(f"wrote {out} from {len(paths)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
