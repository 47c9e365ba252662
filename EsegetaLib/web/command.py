"""`esegeta view RESULT_DIR|FILE.mrb`: serve one result on a local web page.

The result is checked and loaded into the scene before the server binds, so a missing or damaged
result costs one error line and no half-started server. Loopback by default: the page has no
authentication, so another host is allowed only with a warning. `--port 0` asks the system for a
free port; the address is printed once the server listens; Ctrl-C (SIGINT) or SIGTERM stops it
and the command returns 0.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import Optional

from ..errors import EsegetaError

LOOPBACK = "127.0.0.1"


def add_parser(subparsers, common: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Register `view` on the CLI's subparsers (`common`: the CLI's shared --quiet/--debug parser);
    the handler is `args.handler(args) -> exit status`."""
    parser = subparsers.add_parser(
        "view", parents=[common] if common is not None else [],
        help="review a result in a browser with Slicer's views",
        description="Serve a result directory (or its .mrb scene) as a web page with Slicer's slice and "
                    "3D views, the attribution maps as overlays, the metrics and the run's parameters.")
    parser.add_argument("result", help="result directory written by `esegeta explain`, or an .mrb scene")
    parser.add_argument("--host", default=LOOPBACK,
                        help="address to listen on (default 127.0.0.1: this machine only; the page has "
                             "no authentication)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free port)")
    parser.set_defaults(handler=run_view)
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_can_listen(host: str, port: int) -> None:
    """Fail in a second, not after loading the scene, when the address cannot be bound."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind((host, port))
    except OSError as exc:
        what = f"port {port} on {host}" if port else host
        raise EsegetaError(f"Cannot listen on {what} ({exc.strerror or exc}); choose another --port "
                           "(0 picks a free one) or --host.") from None


def run_view(args: argparse.Namespace) -> int:
    """Check, load, then serve until interrupted. Raises `EsegetaError` for user mistakes."""
    if not 0 <= args.port <= 65535:
        raise EsegetaError(f"--port {args.port} is not a port number; use 1-65535, or 0 for a free port.")
    from .result import load_result

    result = load_result(args.result)
    if not is_loopback(args.host):
        print(f"esegeta view: warning: listening on {args.host}: anyone who can reach this address can see "
              "the result (no authentication).", file=sys.stderr, flush=True)
    check_can_listen(args.host, args.port)
    viewer = build_viewer(result, quiet_vtk=not getattr(args, "debug", False))
    serve(viewer, args.host, args.port)
    return 0


def build_viewer(result, quiet_vtk: bool = True):
    """The trame app with the scene loaded (offscreen rendering through EGL when there is no
    display: the views are rendered on the server and sent as images). `quiet_vtk`: no VTK
    warnings on the terminal (VTK 9.6 deprecation notes from every view; --debug shows them);
    problems the user can fix are checked explicitly and reported as one line."""
    if quiet_vtk:
        from vtkmodules.vtkCommonCore import vtkObject

        vtkObject.GlobalWarningDisplayOff()
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    try:
        from .app import EsegetaViewer
    except ImportError as exc:
        raise EsegetaError(f"`esegeta view` needs trame-slicer; run `pip install esegeta[scene]` ({exc}).") from None
    from trame.app import get_server

    server = get_server("esegeta_view", client_type="vue3")
    return EsegetaViewer(result, server=server)


def serve(viewer, host: str, port: int) -> None:
    """Blocking: listen on host:port, print the address when ready, return on SIGINT/SIGTERM."""
    server = viewer.server

    def announce(**_):
        url = f"http://{host if ':' not in host else f'[{host}]'}:{server.port}/"
        print(f"Esegeta viewer for {viewer.result.source} at {url}  (Ctrl-C to stop)", flush=True)

    server.controller.on_server_ready.add(announce)
    os.environ["WSLINK_READY_MSG"] = ""  # wslink's launcher handshake line is noise here
    argv, sys.argv = sys.argv, sys.argv[:1]  # trame parses sys.argv for its own options
    try:
        server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0,
                     disable_logging=True)
    except OSError as exc:  # taken since check_can_listen
        raise EsegetaError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port.") from None
    finally:
        sys.argv = argv
    print("Esegeta viewer stopped.", flush=True)
