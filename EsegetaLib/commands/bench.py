"""`esegeta bench`: Esegeta vs plain Captum vs TorchEsegeta's configuration vs the floor."""
from __future__ import annotations


def add_parser(subparsers, common):
    parser = subparsers.add_parser("bench", parents=[common], help="time methods side by side (see docs/PERFORMANCE.md)")
    from ..benchmark import build_parser

    build_parser(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args) -> int:
    from ..benchmark import run as run_benchmark

    run_benchmark(args)
    return 0
