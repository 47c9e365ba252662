"""`esegeta bench`: Esegeta vs plain Captum vs TorchEsegeta's configuration vs the floor.

The arguments live here (no torch import) so that `esegeta --help` stays fast."""
from __future__ import annotations

import argparse
from typing import Optional

BENCH_METHODS = ("Saliency", "IntegratedGradients", "SmoothGrad", "GradCAM", "Occlusion", "KernelShap")


def add_parser(subparsers, common):
    parser = subparsers.add_parser("bench", parents=[common], help="time methods side by side (see docs/PERFORMANCE.md)")
    build_parser(parser)
    parser.set_defaults(handler=run)
    return parser


SKIPPABLE = ("captum", "torchesegeta")


def run(args) -> int:
    import sys

    if args.from_json:
        reports = _read_reports(args.from_json)  # all of them checked before printing any
        from ..benchmark import markdown

        for report in reports:
            print(markdown(report))
        return 0
    check_args(args)  # before any model is loaded or anything timed
    from ..benchmark import run as run_benchmark

    args.argv = sys.argv[2:]  # recorded in the JSON: the command that produced the figures
    run_benchmark(args)
    return 0


def _read_reports(paths):
    import json

    from ..errors import EsegetaError

    reports = []
    for path in paths:
        try:
            with open(path) as handle:
                reports.append(json.load(handle))
        except OSError as exc:
            raise EsegetaError(f"--from-json: cannot read '{path}' ({exc.strerror or exc}); give the JSON "
                               f"an earlier 'esegeta bench --json PATH' wrote.") from None
        except ValueError as exc:
            raise EsegetaError(f"--from-json: '{path}' is not JSON ({exc}); give the JSON an earlier "
                               f"'esegeta bench --json PATH' wrote.") from None
        if not isinstance(reports[-1], dict):
            raise EsegetaError(f"--from-json: '{path}' is not a benchmark report (expected a JSON object "
                               f"as 'esegeta bench --json PATH' writes).")
    return reports


def _check_size(option: str, value: str, named=("sample", "tof")) -> None:
    """A volume size: one of `named`, an edge (64) or IxJxK, positive integers."""
    from ..errors import EsegetaError

    text = str(value).strip()
    if text in named:
        return
    parts = text.split("x")
    if len(parts) in (1, 3) and all(p.isdigit() and int(p) > 0 for p in parts):
        return
    raise EsegetaError(f"{option}: '{value}' is not a volume size; use {', '.join(named) + ', ' if named else ''}"
                       f"an edge (64) or IxJxK (200x256x120).")


def _names(text) -> list:
    return [v.strip() for v in str(text or "").split(",") if v.strip()]


def check_args(args) -> None:
    """Every option of a run checked before any work: one `EsegetaError` line naming the bad value
    and what to give instead (the CLI exits 2).  Method names are rewritten to their canonical
    spelling (`saliency` -> `Saliency`)."""
    from ..errors import EsegetaError
    from ..methods import get_method

    if args.sizes is not None:
        for size in _names(args.sizes):
            _check_size("--sizes", size)
    for option, value in (("--targets-size", args.targets_size), ("--metrics-cost-size", args.metrics_cost_size)):
        if value is not None:
            _check_size(option, value, named=("sample",))
    _check_size("--quick-look-size", args.quick_look_size, named=())
    if args.study_size is not None and not (str(args.study_size).isdigit() and int(args.study_size) > 0):
        raise EsegetaError(f"--study-size: '{args.study_size}' is not a cube edge; give a positive integer (48).")
    methods = []
    for name in _names(args.methods):
        canonical = {m.lower(): m for m in BENCH_METHODS}.get(name.lower())
        if canonical is None:
            get_method(name)  # an unknown name: its own error, with the closest match
            raise EsegetaError(f"--methods: 'esegeta bench' times {', '.join(BENCH_METHODS)}; '{name}' is not "
                               f"one of them (time it with 'esegeta explain' instead).")
        methods.append(canonical)
    args.methods = ",".join(methods)
    if args.metrics_cost_methods:
        args.metrics_cost_methods = ",".join(get_method(n).name for n in _names(args.metrics_cost_methods))
    unknown = [v for v in _names(args.skip) if v not in SKIPPABLE]
    if unknown:
        raise EsegetaError(f"--skip: unknown runner '{unknown[0]}'; give a comma list of {', '.join(SKIPPABLE)}.")
    if args.batch_size != "auto" and not (str(args.batch_size).isdigit() and int(args.batch_size) > 0):
        raise EsegetaError(f"--batch-size: '{args.batch_size}' is not 'auto' or a positive integer.")
    for option, value in (("--patch-size", args.patch_size), ("--targets", args.targets), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise EsegetaError(f"{option}: {value} must be a positive integer.")


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="esegeta bench", description="Esegeta vs plain Captum vs TorchEsegeta vs the floor.")
    parser.add_argument("--quick", action="store_true", help="CPU-sized volumes and fewer steps")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--methods", default=",".join(BENCH_METHODS))
    parser.add_argument("--sizes", default=None,
                        help="comma list: sample, an edge (64), IxJxK, tof (448x448x160); \"\" = none")
    parser.add_argument("--memory-cap-gb", type=float, default=None, help="GPU memory cap forcing patches")
    parser.add_argument("--json", dest="json_path", default="benchmark.json")
    parser.add_argument("--skip", default="", help="comma list of runners to skip: captum,torchesegeta")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="Esegeta's window edge (default: the API's, whole volume up to 128^3, else 96)")
    parser.add_argument("--batch-size", default="auto",
                        help="Esegeta's EngineOptions.batch_size (default 'auto'; an integer to test the batching)")
    parser.add_argument("--options-study", action="store_true",
                        help="also time bf16/fp16 autocast, torch.compile, channels-last-3d, cudnn.benchmark")
    parser.add_argument("--study-size", default=None, help="cube edge of the option study (CPU 48, CUDA 128)")
    parser.add_argument("--study-skip", default="", help="comma list of model options to leave out, e.g. torch.compile")
    parser.add_argument("--targets", type=int, default=None, metavar="K",
                        help="also time K targets in one batched run beside K single-target runs (e.g. 8)")
    parser.add_argument("--targets-size", default=None, help="volume of the --targets case (default: sample)")
    parser.add_argument("--targets-vjp", default="auto", choices=("auto", "vmap", "loop"),
                        help="how the K targets' backward runs: vmap (one vectorised backward), loop, or auto "
                             "(vmap on GPUs, loop on CPUs)")
    parser.add_argument("--targets-bound", action="store_true",
                        help="also measure the network's forward and backward at K targets against K single "
                             "passes: the best ratio batching can reach here, beside --targets' measured one")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 is steadier on a shared, loaded CPU")
    extras = parser.add_argument_group("goals of issue #18 (bench_quick.py; instead of the runner comparison)")
    extras.add_argument("--quick-look", action="store_true",
                        help="Saliency, Integrated Gradients, Grad-CAM in one session on a generated volume: "
                             "each method's time and ratio to its fwd+bwd floor (goal <= 1.1x; whole <= 3 min)")
    extras.add_argument("--quick-look-size", default="200x256x120", help="IxJxK of the quick look's volume")
    extras.add_argument("--metrics-cost", action="store_true",
                        help="default metrics and sensitivity of each method against its attribution time")
    extras.add_argument("--metrics-cost-size", default="sample", help="volume of --metrics-cost (sample, N, IxJxK)")
    extras.add_argument("--metrics-cost-methods", default=None, help="comma list (default Saliency,IntegratedGradients,GradCAM)")
    extras.add_argument("--sensitivity-samples", type=int, default=10, help="n_samples of sensitivity (default 10)")
    extras.add_argument("--sensitivity-one-by-one", action="store_true",
                        help="also time sensitivity explaining one perturbed volume at a time")
    extras.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="engine precision of --quick-look and --metrics-cost (default auto)")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="print earlier runs' JSON as Markdown tables (for docs/PERFORMANCE.md) and exit")
    return parser
