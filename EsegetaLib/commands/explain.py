"""`esegeta explain VOLUME [--model MODEL] --out DIR`: attribution maps for a segmentation model on
one volume, written with the segmentation, metrics and provenance into DIR (whole or not at all)."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "explain"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _batch(text: str):
    return "auto" if text == "auto" else _positive_int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def add_run_arguments(parser, methods_default: str, metrics_default: str = "default") -> None:
    """Options shared by `explain` and `demo` (what to explain, how the engine runs, outputs)."""
    what = parser.add_argument_group("what to explain")
    what.add_argument("--methods", default=methods_default, metavar="A,B|all",
                      help=f"comma-separated method names or 'all' (default: {methods_default}); see 'esegeta methods'")
    what.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                      help="a method parameter, repeatable (e.g. IntegratedGradients.n_steps=32)")
    what.add_argument("--class", dest="class_index", default=None, metavar="N",
                      help="class index or name from the model card (default: the first foreground class)")
    what.add_argument("--activation", default=None, choices=("softmax", "sigmoid"),
                      help="how outputs become probabilities (default: the model's; a one-channel model is "
                           "sigmoid, class 0 = foreground)")
    what.add_argument("--region", default="predicted",
                      metavar="predicted|whole|roi:MASKFILE|point:I,J,K|component:I,J,K[:MM]|components[:N]|boundary[:MM]",
                      help="voxels whose score is explained (default: predicted, the model's own mask); "
                           "component:I,J,K = the connected vessel containing that voxel (with :MM, only its part "
                           "within MM mm along the vessel); components[:N] = every component of N voxels or more "
                           "(default 27), one map each; boundary[:MM] = the wall: the score just inside the "
                           "predicted boundary minus just outside it, MM mm each side (default: one voxel)")
    what.add_argument("--classes", default=None, metavar="all|A,B",
                      help="several classes at once, one map per class in one batched run (names or indices; "
                           "all = every foreground class the model predicts)")
    what.add_argument("--boundary", dest="boundary_mm", type=float, default=None, metavar="MM",
                      help="explain the boundary band of the region instead (MM mm each side; with component, "
                           "components, roi or predicted)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: a CUDA GPU when there is one, else the CPU (default: auto)")
    engine.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto: bf16 autocast where the device computes bf16 natively (recent GPUs, CPUs "
                             "with AMX or AVX-512 BF16), a method that loses completeness in bf16 rerun in "
                             "fp32; fp32 elsewhere. Non-finite patches are always retried in fp32 (default: auto)")
    engine.add_argument("--patch-size", type=_positive_int, default=None, metavar="N",
                        help="sliding-window size in voxels (default: the model card's)")
    engine.add_argument("--overlap", type=_fraction, default=0.25, metavar="F",
                        help="window overlap fraction in [0, 1) (default: 0.25)")
    engine.add_argument("--batch-size", type=_batch, default="auto", metavar="N",
                        help="windows per batch, or auto (largest that fits; default)")
    engine.add_argument("--seed", type=_seed, default=0, metavar="N", help="random seed (default: 0)")
    engine.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--metrics", default=metrics_default, metavar="LIST|none|all",
                     help="evaluation metrics per method (default: "
                          + ("the metrics module's default set" if metrics_default == "default" else metrics_default)
                          + "); runtime, device and peak memory are always recorded")
    out.add_argument("--metric-param", action="append", default=[], metavar="METRIC.NAME=VALUE",
                     help="a metric's parameter, repeatable (e.g. sensitivity.n_samples=4, deletion.domain=region; "
                          "see docs/readme/metrics.md)")
    out.add_argument("--reference-mask", default=None, metavar="MASKFILE",
                     help="a ground-truth (or reference) mask on the volume's grid for the localisation metrics "
                          "(relevance_mass, relevance_rank, vxap, pointing_game, relevance_shares); "
                          "default: the explained region")
    out.add_argument("--stability", default=None, metavar="flips|noise:N[:F]",
                     help="rerun every method under test-time augmentation (flips: the 8 axis mirrors, mapped "
                          "back; noise:N[:F]: N draws of Gaussian noise, F x the volume's stdev, default 0.05) and "
                          "write stability/<method>_mean, <method>_cv (coefficient of variation) and the "
                          "prediction's entropy; costs that many runs")
    out.add_argument("--no-scene", dest="scene", action="store_false",
                     help="skip esegeta.mrb and previews/ (the Slicer review scene)")
    out.add_argument("--overwrite", action="store_true", help="replace an earlier result in the output directory")


def add_parser(subparsers, common):
    parser = subparsers.add_parser(NAME, parents=[common], help="explain a model's segmentation of a volume",
                                   description=__doc__.replace("\n", " "))
    parser.add_argument("volume", metavar="VOLUME", help="input volume (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)")
    parser.add_argument("--model", default="bundled", metavar="MODEL",
                        help="torch.export (.pt2), TorchScript (.pt/.ts), a model card (.json), an nnU-Net v2 "
                             "trained-model folder, a MONAI bundle (folder or .zip), or 'bundled' "
                             "(the bundled vessel UNet for TOF-MRA; the default)")
    parser.add_argument("--fold", default=None, metavar="N|all",
                        help="nnU-Net folders: one fold, or 'all' (the fold_all model); default: every fold_N, "
                             "ensembled (mean of the folds' logits)")
    parser.add_argument("--mirroring", action="store_true",
                        help="nnU-Net folders: test-time mirroring, as nnUNetPredictor does by default (up to 8x "
                             "the cost; default: off)")
    parser.add_argument("--out", required=True, metavar="DIR", help="result directory (created; must be empty)")
    add_run_arguments(parser, methods_default="Saliency,IntegratedGradients")
    parser.set_defaults(handler=run)
    return parser


def request_from(args, volume, model):
    from ..runner import ExplainRequest, parse_metric_params, parse_param_assignments

    return ExplainRequest(volume=volume, model=model, methods=args.methods,
                          params=parse_param_assignments(args.param), class_index=args.class_index,
                          region=args.region, classes=getattr(args, "classes", None),
                          boundary_mm=getattr(args, "boundary_mm", None), device=args.device, precision=args.precision,
                          patch_size=args.patch_size, overlap=args.overlap, batch_size=args.batch_size,
                          metrics=args.metrics, seed=args.seed, scene=args.scene,
                          activation=getattr(args, "activation", None), fold=getattr(args, "fold", None),
                          mirroring=bool(getattr(args, "mirroring", False)),
                          reference_mask=getattr(args, "reference_mask", None),
                          metric_params=parse_metric_params(getattr(args, "metric_param", None) or []),
                          stability=getattr(args, "stability", None))


def run_request(args, request, out: Path, command: str) -> Path:
    """Check everything, run, and report; shared by `explain` and `demo`."""
    from ..outputs import check_output_directory
    from ..progress import Progress
    from ..runner import execute, prepare

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    with Progress("quiet" if args.quiet else "auto") as progress:
        check_output_directory(out, args.overwrite)  # before loading anything: a mistake costs nothing
        progress.note(f"esegeta {command}: loading the volume and the model ...")
        prepared = prepare(request)
        for warning in prepared.warnings:
            progress.warn(warning)
        for line in prepared.model.description.lines():
            progress.note(line)
        methods = ", ".join(name for name, _ in prepared.methods)
        label = f"class {prepared.target.class_index}"
        if prepared.class_name != label:
            label += f" ({prepared.class_name})"
        classes = prepared.target.classes
        if classes is not None:  # --classes: every class named, not the default one
            names = prepared.target.class_names or []
            label = "every class" if classes == "all" else "classes " + ", ".join(
                f"{c} ({names[c]})" if c < len(names) else str(c) for c in classes)
        progress.note(f"explaining {label}, region {request.region}, on {prepared.device}: {methods}")
        folder = execute(prepared, out, overwrite=args.overwrite, progress=progress, note=progress.note,
                         warn=progress.warn,
                         command=command, argv=getattr(args, "argv", None))
        for line in trust_warnings(folder):  # users read the terminal: say which maps fell short
            progress.warn(line)
    return folder


def trust_warnings(folder: Path) -> list:
    """One line per trust check of `run.json` that did not pass (warn/fail), naming method and check."""
    import json

    try:
        run = json.loads((Path(folder) / "run.json").read_text())
    except (OSError, ValueError):
        return []
    lines = []

    def walk(node, where):
        if isinstance(node, dict):
            for check in node.get("checks") or []:
                if isinstance(check, dict) and check.get("status") in ("warn", "fail"):
                    value = check.get("value")
                    figure = f" ({value:.3g})" if isinstance(value, (int, float)) else ""
                    lines.append(f"trust: {where} {check.get('name')} {check['status']}{figure}: "
                                 f"{check.get('detail', '')}".rstrip(": "))
            for key, value in node.items():
                if key != "checks":
                    walk(value, f"{where}/{key}" if where else key)

    walk(run.get("results", {}), "")
    return lines


def run(args) -> int:
    out = Path(args.out)
    request = request_from(args, args.volume, args.model)
    folder = run_request(args, request, out, NAME)
    if not args.quiet:
        from ..progress import safe_print

        safe_print(how_to_open(folder))  # the result is written: a closed stdout changes nothing
    return 0


def how_to_open(folder: Path) -> str:
    """The closing lines of `explain` and `demo`: where the result is and how to look at it."""
    folder = Path(folder)
    lines = [f"Results written to {folder}"]
    if (folder / "esegeta.mrb").exists():
        lines.append(f"Open in 3D Slicer: drag {folder / 'esegeta.mrb'} onto the Slicer window "
                     "(or File > Open Data); the maps are overlaid on the volume with their colour tables.")
    else:
        attributions = folder / "attributions"
        lines.append("Open in 3D Slicer: File > Add Data, choose the input volume (run.json 'inputs'), the "
                     f"segmentation in {folder} and the maps in {attributions}; set a map as foreground.")
    lines.append(f"Open in a browser: esegeta view {folder}")
    if (folder / "previews").is_dir():
        lines.append(f"Pictures: {folder / 'previews'}")
    if (folder / "deletion_insertion.png").is_file():
        lines.append(f"Metrics: {folder / 'metrics.csv'} (curves: {folder / 'deletion_insertion.png'})")
    elif (folder / "deletion_insertion").is_dir():  # several targets: a figure each
        lines.append(f"Metrics: {folder / 'metrics.csv'} (curves per target: {folder / 'deletion_insertion'})")
    else:
        lines.append(f"Metrics: {folder / 'metrics.csv'}")
    return "\n".join(lines)
