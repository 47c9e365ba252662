"""Metric values of several methods on the bundled sample with the bundled model (not a test: a
script behind the numbers in docs/readme/metrics.md and the issue note).

    python Testing/metrics/bundled_sample_metrics.py OUT_DIR [--metrics all] [--methods Saliency,...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from EsegetaLib.engine import ExplainSession  # noqa: E402
from EsegetaLib.metrics import evaluate  # noqa: E402
from EsegetaLib.models import load_default_model  # noqa: E402
from EsegetaLib.options import EngineOptions, Target  # noqa: E402
from EsegetaLib.results import MethodResult  # noqa: E402
from EsegetaLib.sample import load_sample  # noqa: E402

DEFAULT_METHODS = "Saliency,InputXGradient,IntegratedGradients,GuidedBackprop,GradCAM"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--metrics", default="all")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--params", default='{"randomisation": {"max_stages": 4}}', help="metric params, JSON")
    parser.add_argument("--method-params", default='{"IntegratedGradients": {"n_steps": 16}}', help="JSON")
    args = parser.parse_args(argv)
    image = load_sample()
    spacing = tuple(float(s) for s in np.linalg.norm(image.ijk_to_ras[:3, :3], axis=0))
    t0 = time.perf_counter()
    session = ExplainSession(image.array, load_default_model(), Target(class_index=1, region="predicted"),
                             EngineOptions(device=args.device), spacing=spacing)
    print(f"session {time.perf_counter() - t0:.1f}s, windows {len(session.windows)}, "
          f"region {int(session.region.sum())} voxels", flush=True)
    results = {}
    for name in args.methods.split(","):
        results[name] = session.attribute(name, json.loads(args.method_params).get(name))
        print(f"{name}: {results[name].seconds:.1f}s", flush=True)
    rng = np.random.default_rng(0)
    control = rng.normal(size=image.array.shape).astype(np.float32)
    results["random (control)"] = MethodResult("random (control)", control, {}, 0.0)
    report = evaluate(session, results, metrics=args.metrics, params=json.loads(args.params),
                      progress=lambda f, m: print(f"{f:.2f} {m}", flush=True))
    paths = report.write(args.out)
    for row in report.table():
        print(row)
    print(paths)


if __name__ == "__main__":
    main()
