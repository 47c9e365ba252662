"""`esegeta view RESULT_DIR|FILE.mrb [--host 127.0.0.1] [--port 0]`: review a result in a browser
with Slicer's views. The command lives in `EsegetaLib/web/command.py`; this file registers it."""
from __future__ import annotations


def add_parser(subparsers, common):
    from ..web.command import add_parser as add_view_parser  # argparse only: keeps `--help` fast

    return add_view_parser(subparsers, common)
