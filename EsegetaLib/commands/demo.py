"""`esegeta demo [--out DIR] [--methods ...]`: explain the bundled synthetic TOF-MRA sample with the
bundled vessel model, using a few cheap methods, and say how to open the result in 3D Slicer."""
from __future__ import annotations

from pathlib import Path

from .explain import add_run_arguments, how_to_open, request_from, run_request

NAME = "demo"
DEFAULT_OUT = "esegeta-demo"  # ignored by git in a checkout (.gitignore), replaced by the next demo


def add_parser(subparsers, common):
    from ..runner import DEMO_METHODS, DEMO_METRICS

    parser = subparsers.add_parser(NAME, parents=[common], help="explain the bundled sample with the bundled model",
                                   description=__doc__.replace("\n", " "))
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"result directory (default: ./{DEFAULT_OUT}, replacing an earlier demo's result)")
    add_run_arguments(parser, methods_default=",".join(DEMO_METHODS), metrics_default=DEMO_METRICS)
    parser.set_defaults(handler=run)
    return parser


def run(args) -> int:
    from ..outputs import RESULT_MARKER
    from ..progress import safe_print
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
    out = Path(args.out or DEFAULT_OUT)
    if args.out is None and _earlier_demo(out / RESULT_MARKER):
        args.overwrite = True  # the default folder holds an earlier demo: replace it
    folder = run_request(args, request, out, NAME)
    safe_print(how_to_open(folder))
    return 0


def _earlier_demo(run_json: Path) -> bool:
    import json

    try:
        return json.loads(run_json.read_text()).get("command") == NAME
    except (OSError, ValueError, AttributeError):
        return False
