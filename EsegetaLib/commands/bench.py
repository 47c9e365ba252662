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


def run(args) -> int:
    import sys

    from ..benchmark import markdown, run as run_benchmark

    if args.from_json:
        import json

        for path in args.from_json:
            with open(path) as handle:
                print(markdown(json.load(handle)))
        return 0
    args.argv = sys.argv[2:]  # recorded in the JSON: the command that produced the figures
    run_benchmark(args)
    return 0


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
