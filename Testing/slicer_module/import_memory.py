"""Peak extra memory of importing N maps into a slicer-core scene (Linux: VmHWM after resetting it
through /proc/self/clear_refs). Run as a script in a fresh process; prints one JSON line.

    python Testing/slicer_module/import_memory.py [--shape 192 160 128] [--maps 4] [--all-at-once]

"extra" is the peak resident memory during the import minus the memory before it and minus the N
map volumes the scene holds afterwards, i.e. what the import needed on top of its result.
`--all-at-once` measures the former path (every map read into NumPy first, then added) for comparison.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_result(folder: Path, shape, n_maps: int, affine) -> None:
    """A result folder as the worker commits it (run.json + uncompressed float32 maps)."""
    from EsegetaLib.io import Image, write_image

    (folder / "attributions").mkdir(parents=True)
    reference = Image(np.zeros((1,) + tuple(shape), np.float32), affine, "nrrd")
    results = {}
    rng = np.random.default_rng(0)
    for i in range(n_maps):
        name = f"Method{i}"
        values = rng.standard_normal(shape, dtype=np.float32)
        write_image(folder / "attributions" / f"{name}.nrrd", values, reference, dtype=np.float32, compress=False)
        results[name] = {"file": f"attributions/{name}.nrrd", "seconds": 1.0, "metadata": {"signed": i % 2 == 0}}
        del values
    run = {"results": results, "segmentation": None, "target": {"class_index": 1, "class_name": "vessel"}}
    (folder / "run.json").write_text(json.dumps(run))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=3, default=[192, 160, 128])
    parser.add_argument("--maps", type=int, default=4)
    parser.add_argument("--all-at-once", action="store_true")
    args = parser.parse_args(argv)
    from EsegetaLib.slicer import scene as bridge
    from EsegetaLib.slicer.result_import import import_result

    shape = tuple(args.shape)
    affine = np.diag([0.4, 0.4, 0.6, 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_result(tmp / "warmup", (8, 8, 8), 1, affine)
        write_result(tmp / "result", shape, args.maps, affine)
        scene = bridge.new_scene()
        warm = bridge.volume_from_array(scene, np.zeros((8, 8, 8), np.float32), affine, "warm")
        import_result(scene, warm, tmp / "warmup")  # loads the readers and logics once
        if args.all_at_once:
            from EsegetaLib.slicer.worker import read_result
            read_result(tmp / "warmup")
        volume = bridge.volume_from_array(scene, np.zeros(shape, np.float32), affine, "input")
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        before = _status("VmRSS")
        if args.all_at_once:
            from EsegetaLib.slicer.worker import read_result
            result = read_result(tmp / "result")
            for name, values in result["maps"].items():
                bridge.add_map(scene, values, volume, name, signed=result["signed"][name])
            del result, values
        else:
            import_result(scene, volume, tmp / "result")
        gc.collect()
        peak = _status("VmHWM")
    map_bytes = int(np.prod(shape)) * 4
    extra = peak - before - args.maps * map_bytes
    report = {"shape": list(shape), "maps": args.maps, "map_mb": round(map_bytes / 2 ** 20, 1),
              "peak_extra_mb": round(extra / 2 ** 20, 1), "peak_extra_maps": round(extra / map_bytes, 2),
              "path": "all-at-once (former)" if args.all_at_once else "one at a time"}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
