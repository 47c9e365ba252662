"""`python -m EsegetaLib.web RESULT` = `esegeta view RESULT` (useful before the CLI registers it)."""
import argparse
import sys

from ..errors import EsegetaError
from .command import add_parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="esegeta")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["view", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.handler(args)
    except EsegetaError as exc:
        print(f"esegeta: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
