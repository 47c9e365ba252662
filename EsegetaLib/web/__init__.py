"""`esegeta view`: review a result in a browser with Slicer's own views (trame-slicer).

`add_parser(subparsers)` registers the sub-command; `load_result` checks a result without any
MRML; the app itself (`app.EsegetaViewer`) imports trame-slicer only when a page is served.
"""
from .command import add_parser, run_view

__all__ = ["add_parser", "run_view"]
