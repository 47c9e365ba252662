"""`esegeta demo [--out DIR] [--methods ...]`: explain the bundled synthetic TOF-MRA sample with the
bundled vessel model, using a few cheap methods, and say how to open the result in 3D Slicer."""
from __future__ import annotations

from pathlib import Path

from .explain import add_run_arguments, request_from, run_request

NAME = "demo"
DEFAULT_OUT = "esegeta-demo"


def add_parser(subparsers, common):
    from ..runner import DEMO_METHODS, DEMO_METRICS

    parser = subparsers.add_parser(NAME, parents=[common], help="explain the bundled sample with the bundled model",
                                   description=__doc__.replace("\n", " "))
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"result directory (default: ./{DEFAULT_OUT})")
    add_run_arguments(parser, methods_default=",".join(DEMO_METHODS), metrics_default=DEMO_METRICS)
    parser.set_defaults(handler=run)
    return parser


def run(args) -> int:
    from ..runner import DEMO_PARAMS, parse_param_assignments, split_list
    from ..sample import load_sample

    sample = load_sample()
    request = request_from(args, sample.path, None)
    # The demo's cheaper defaults apply only to methods the user did not tune with --param.
    given = parse_param_assignments(args.param)
    chosen = {m.lower() for m in split_list(args.methods)}
    for method, params in DEMO_PARAMS.items():
        if (method.lower() in chosen or chosen == {"all"}) and method not in given:
            request.params.setdefault(method, dict(params))
    folder = run_request(args, request, Path(args.out), NAME)
    print(how_to_open(folder))
    return 0


def how_to_open(folder: Path) -> str:
    folder = Path(folder)
    lines = [f"Results: {folder}"]
    if (folder / "esegeta.mrb").exists():
        lines.append(f"Open in 3D Slicer: drag {folder / 'esegeta.mrb'} onto the Slicer window "
                     "(or File > Open Data); the maps are overlaid on the sample with their colour tables.")
    else:
        lines.append("Open in 3D Slicer: File > Add Data, choose the sample (see run.json 'inputs'), "
                     f"{folder / 'segmentation.nii.gz'} (as a segmentation) and the maps in "
                     f"{folder / 'attributions'}; set a map as foreground in the slice views.")
    if (folder / "previews").is_dir():
        lines.append(f"Previews: {folder / 'previews'}")
    lines.append(f"Metrics: {folder / 'metrics.csv'} (faithfulness metrics too: --metrics default or all)")
    return "\n".join(lines)
