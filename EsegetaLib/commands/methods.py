"""`esegeta methods [--json]`: every registered attribution method with its family, whether its
map is signed, its baseline and its default parameters.  Methods whose result is not an attribution
of the target on this input are named below the table: model-level (a visualisation of the model)
and activation-based (a layer's activation on this input)."""
from __future__ import annotations

import json
import sys

NAME = "methods"


def add_parser(subparsers, common):
    parser = subparsers.add_parser(NAME, parents=[common], help="list the attribution methods",
                                   description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    parser.set_defaults(handler=run)
    return parser


def _baseline(meta) -> str:
    for p in meta["params"]:
        if p["name"] in ("baseline", "baselines"):
            return str(p["default"])
    return "yes" if meta["needs_baseline"] else "-"


def _shown(param) -> str:
    if param.get("auto"):
        return "auto"  # the default (0 or empty) means "chosen from the volume or the model"
    return "-" if param["default"] in ("", None) else str(param["default"])


def _defaults(meta) -> str:
    return ", ".join(f"{p['name']}={_shown(p)}" for p in meta["params"]) or "-"


def levels_note(metas) -> str:
    """Which methods give something other than an attribution of the target on this input."""
    model = [m["name"] for m in metas if m.get("level") == "model"]
    activation = [m["name"] for m in metas if m.get("level") != "model" and m.get("explains_target") is False]
    lines = []
    if model:
        lines.append(f"Model-level (a visualisation of the network, not an explanation of this input): {', '.join(model)}.")
    if activation:
        lines.append(f"Activation-based (a layer's activation on this input, not an attribution of the target): "
                     f"{', '.join(activation)}.")
    return "\n".join(lines)


def table(metas) -> str:
    """A plain-text table (fits a terminal; the JSON has everything)."""
    header = ("method", "family", "signed", "baseline", "defaults")
    rows = [(m["name"], m["family"], "signed" if m["signed"] else "unsigned", _baseline(m), _defaults(m))
            for m in metas]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(header[:4], widths)) + "  " + header[4]]
    for row in rows:
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    return "\n".join(lines)


def run(args) -> int:
    from ..methods import all_methods
    from ..provenance import jsonable

    metas = [spec.metadata() for spec in all_methods()]
    if args.json:
        json.dump(jsonable(metas), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table(metas))
        note = levels_note(metas)
        if note:
            print("\n" + note)
        print(f"\n{len(metas)} methods. Parameters: --param METHOD.NAME=VALUE; details: esegeta methods --json")
    return 0
