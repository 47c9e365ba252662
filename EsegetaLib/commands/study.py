"""`esegeta study STUDY.yaml --out DIR`: run every model on every volume with every method of a
study file, then write study.csv/parquet, summary.csv, figures/ and report.md into DIR."""
from __future__ import annotations

import sys

NAME = "study"


def add_parser(subparsers, common):
    parser = subparsers.add_parser(NAME, parents=[common], help="run a study: models x methods x volumes",
                                   description=__doc__.replace("\n", " "))
    parser.add_argument("study", metavar="STUDY.yaml", help="the study file (docs/readme/study.md)")
    parser.add_argument("--out", required=True, metavar="DIR", help="study folder (created; cases/ inside)")
    parser.add_argument("--engine", default="local", choices=("local", "ray"),
                        help="local: cases one after another here (default); ray: one Ray task per case")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="Ray cluster to connect to (e.g. ray://head:10001 or auto); without it a local "
                             "Ray instance is started and shut down")
    parser.add_argument("--resume", action="store_true",
                        help="continue a study in DIR: finished cases are kept, the others (re)run")
    parser.set_defaults(handler=run)
    return parser


def run(args) -> int:
    from ..study import StudySpecError, run_study

    try:
        outcome = run_study(args.study, args.out, engine=args.engine, address=args.address, resume=args.resume,
                            quiet=args.quiet, argv=getattr(args, "argv", None))
    except StudySpecError as exc:
        # Every problem on its own line (the command line's usual one-line error would run them together).
        print(f"esegeta: error: the study file has {len(exc.issues)} problem(s); nothing was run:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"esegeta: interrupted; finished cases in {args.out} are kept: run the same command with "
              "--resume to finish the study.", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"Study written to {outcome.out} (report.md)")
    return outcome.exit_status
