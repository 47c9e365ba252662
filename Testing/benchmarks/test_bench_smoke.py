"""The benchmark's code path on a tiny volume (figures are in docs/PERFORMANCE.md, not asserted).

Asserts facts only: with one window, Esegeta's map equals plain Captum's (r = 1), every runner
produced a row, and the floor and overlap bookkeeping are filled in.
"""
import json

from EsegetaLib.benchmark import run
from EsegetaLib.commands.bench import build_parser


def test_bench_tiny_volume(tmp_path):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(["--quick", "--sizes", "24", "--methods", "Saliency,Occlusion",
                                      "--json", str(out)])
    run(args)
    report = json.loads(out.read_text())
    rows = {(r["method"], r["runner"]): r for r in report["rows"]}
    for method in ("Saliency", "Occlusion"):
        for runner in ("esegeta", "captum", "torchesegeta"):
            assert rows[(method, runner)]["seconds"] > 0
        assert rows[(method, "esegeta")]["floor_s"] > 0
        # one window covers 32^3: Esegeta and plain Captum compute the same map
        assert rows[(method, "captum")]["corr_with_esegeta"] > 0.999
    floor = report["floors"]["24"]
    assert floor["windows"] == 1 and floor["voxels_processed_over_volume"] >= 1.0
