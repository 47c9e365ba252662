"""Two measured goals of `esegeta bench` (issue #18), each printed as figures and ratios side by side:

- `--quick-look`: the Slicer "Quick look" method set (Saliency, Integrated Gradients at its default,
  adaptive where available, Grad-CAM) on a generated chris_MRA-sized volume (200x256x120 by default,
  so it runs anywhere) in one session, at the engine's default precision ('auto'). Each method's
  time against its floor: its window passes (forward+backward; IG: the steps it used per window)
  times the measured cost of one pass at the engine's batch size and precision. Goals: every method
  <= 1.1x its floor, the whole quick look (segmentation + methods) <= 3 minutes on 2 CPU cores.
- `--metrics-cost`: for each method, the default metrics (infidelity, deletion, insertion,
  localisation, sparseness, complexity) against the method's attribution time (goal <= 3x), and
  sensitivity with n samples (goal <= (1 + 0.6 n)x), batched through the method's window batches;
  `--sensitivity-one-by-one` also times the one-at-a-time path for comparison.

Wall-clock figures from a shared machine are noisy: the load average is printed with them.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, List, Optional

import torch

QUICK_LOOK_METHODS = ("Saliency", "IntegratedGradients", "GradCAM")
QUICK_LOOK_SIZE = "200x256x120"  # chris_MRA's grid (TOF-MRA, 6.1 M voxels)
QUICK_LOOK_BUDGET_S = 180.0
FLOOR_GOAL = 1.1
METRICS_GOAL = 3.0
SENSITIVITY_SLOPE = 0.6


def measured(fn):
    """(fn(), wall seconds, CPU seconds of this process). On a shared, loaded machine the CPU time
    is the steadier figure (wall time there mostly measures waiting for a core)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _session(loaded, size: str, device: torch.device, precision: str, patch_size=None):
    from .benchmark import make_volume
    from .engine import ExplainSession
    from .options import EngineOptions, Target

    array, spacing = make_volume(size)
    options = EngineOptions(device=device.type, precision=precision, divisor=loaded.card.divisor,
                            patch_size=patch_size)
    session, wall, cpu = measured(lambda: ExplainSession(array, loaded, Target(class_index=1, region="predicted"),
                                                         options, spacing=spacing))
    return session, (wall, cpu), array


def pass_seconds(session, backward: bool) -> float:
    """Seconds per window of one forward(+backward) pass at the session's batch size and precision
    (the floor's unit): the best of two timed batches after a warm-up."""
    from .benchmark import fwd_bwd_step, timed
    from .device import autocast

    batch = max(1, int(session.batch_size))
    x = torch.randn((batch, session.volume.shape[0]) + tuple(session.grid.patch), device=session.device)
    with autocast(session.device, session.amp_dtype):
        fwd_bwd_step(session.network, x, backward)
        seconds, _, _ = timed(lambda: fwd_bwd_step(session.network, x, backward), session.device, repeats=2)
    return seconds / batch


def method_passes(result, n_active: int) -> float:
    """Forward+backward window passes a method needs at least: IG the gradient evaluations it used
    per window (adaptive: `steps_used_mean`; fixed: n_steps), other gradient and CAM methods one
    (Grad-CAM's backward stops at its layer: an upper bound)."""
    diag, params = result.diagnostics, result.params
    steps = diag.get("steps_used_mean")
    if steps is None and result.name == "IntegratedGradients":
        steps = params.get("n_steps", 1)
    passes = float(steps or 1) * n_active
    if diag.get("reduced_precision_seconds") is not None:
        passes *= 2  # bf16 run + fp32 rerun (the floor counts both; the note says so)
    return passes


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def quick_look(loaded, device: torch.device, size: str = QUICK_LOOK_SIZE, precision: str = "auto",
               methods=QUICK_LOOK_METHODS, patch_size=None) -> Dict[str, Any]:
    """One session, the quick-look methods at their defaults; figures and ratios (see module doc)."""
    from .benchmark import _warm_up, environment, load_average

    _warm_up(loaded, methods, device)  # imports, lazy initialisation, kernels: once per process, untimed
    session, (seg_s, seg_cpu), array = _session(loaded, size, device, precision, patch_size)
    n_windows, n_active = len(session.windows), len(session.active)
    fwd_bwd, fwd = pass_seconds(session, True), pass_seconds(session, False)
    rows: List[Dict[str, Any]] = [{"step": "segmentation", "seconds": seg_s, "cpu_s": seg_cpu,
                                   "floor_s": n_windows * fwd, "passes": n_windows, "kind": "forward",
                                   "precision": session.precision,
                                   "note": "+ volume statistics, determinism check (2 fp32 forwards of one window)"}]
    for name in methods:
        result, _, cpu_s = measured(lambda: session.attribute(name))
        passes = method_passes(result, n_active)
        note = []
        if "steps_used_mean" in result.diagnostics:
            note.append(f"adaptive: {result.diagnostics['steps_used_mean']:.1f} steps/window "
                        f"(max {result.diagnostics.get('steps_used_max')})")
        elif name == "IntegratedGradients":
            note.append(f"{result.params.get('n_steps')} fixed steps")
        if result.diagnostics.get("reduced_precision_seconds") is not None:
            note.append("bf16 lost completeness: rerun in fp32 (floor counts both)")
        checks = {c.name: c.status for c in result.checks}
        rows.append({"step": name, "seconds": result.seconds, "cpu_s": cpu_s, "floor_s": passes * fwd_bwd, "passes": passes,
                     "kind": "forward+backward", "precision": result.diagnostics.get("precision"),
                     "checks": checks, "note": "; ".join(note)})
        del result
        print(f"{name}: {rows[-1]['seconds']:.2f} s, floor {rows[-1]['floor_s']:.2f} s", flush=True)
    total = sum(r["seconds"] for r in rows)
    for r in rows:
        r["x_floor"] = _ratio(r["seconds"], r["floor_s"])
    return {"size": list(array.shape[1:]), "device": str(device), "precision_requested": precision,
            "precision": session.precision, "precision_reason": session.precision_reason,
            "patch": list(session.grid.patch), "windows": n_windows, "active_windows": n_active,
            "batch_size": session.batch_size, "fwd_bwd_per_window_s": fwd_bwd, "fwd_per_window_s": fwd,
            "rows": rows, "total_s": total, "total_cpu_s": sum(r["cpu_s"] for r in rows),
            "threads": torch.get_num_threads(), "budget_s": QUICK_LOOK_BUDGET_S, "floor_goal": FLOOR_GOAL,
            "within_budget": total <= QUICK_LOOK_BUDGET_S,
            "every_method_within_floor_goal": all((r["x_floor"] or math.inf) <= FLOOR_GOAL for r in rows[1:]),
            "load_average_end": load_average(), "environment": environment()}


def format_quick_look(report: Dict[str, Any]) -> str:
    lines = [f"Quick look on {'x'.join(map(str, report['size']))} ({report['windows']} windows of "
             f"{'x'.join(map(str, report['patch']))}, {report['active_windows']} in the region, batch "
             f"{report['batch_size']}), {report['precision']} ({report['precision_reason']}); fwd+bwd "
             f"{report['fwd_bwd_per_window_s']:.3f} s, fwd {report['fwd_per_window_s']:.3f} s per window",
             f"{'step':>20} {'seconds':>9} {'cpu s':>8} {'floor s':>9} {'x floor':>8} {'goal':>6} {'passes':>7} "
             f"{'precision':>9}  note"]
    for r in report["rows"]:
        goal = "" if r["step"] == "segmentation" else f"<={report['floor_goal']:g}"
        lines.append(f"{r['step']:>20} {r['seconds']:9.2f} {r['cpu_s']:8.2f} {r['floor_s']:9.2f} {_fmt(r['x_floor']):>8} {goal:>6} "
                     f"{r['passes']:7.0f} {str(r.get('precision')):>9}  {r.get('note', '')}")
    lines.append(f"{'total':>20} {report['total_s']:9.2f} {report['total_cpu_s']:8.2f}  {report['threads']} thread(s), budget {report['budget_s']:.0f} s: "
                 f"{'within' if report['within_budget'] else 'OVER'}; every method <= {report['floor_goal']:g}x "
                 f"floor: {'yes' if report['every_method_within_floor_goal'] else 'NO'}; load {report['load_average_end']}")
    return "\n".join(lines)


METRICS_COST_METHODS = ("Saliency", "IntegratedGradients", "GradCAM")


def metrics_cost(loaded, device: torch.device, size: str = "sample", precision: str = "auto",
                 methods=METRICS_COST_METHODS, n_sensitivity: int = 10, one_by_one: bool = False,
                 patch_size=None) -> Dict[str, Any]:
    """Per method, in one session: its attribution, its default metrics (own metric context, so it
    pays for infidelity's score changes itself), its sensitivity batched, and optionally one by one."""
    from .benchmark import load_average
    from .metrics import DEFAULT_METRICS, evaluate, evaluate_maps

    session, (seg_s, _), array = _session(loaded, size, device, precision, patch_size)
    params = {"sensitivity": {"n_samples": int(n_sensitivity)}}
    sens_goal = 1.0 + SENSITIVITY_SLOPE * int(n_sensitivity)
    rows = []
    for name in methods:
        session.attribute(name)  # warm-up of this method's code path (first calls initialise kernels)
        result, attr_wall, attr_cpu = measured(lambda: session.attribute(name))
        one = {name: result}
        default, met_wall, met_cpu = measured(lambda: evaluate(session, one, metrics=list(DEFAULT_METRICS)))
        sens, sens_wall, sens_cpu = measured(lambda: evaluate(session, one, metrics="sensitivity", params=params))
        row = {"method": name, "precision": result.diagnostics.get("precision"),
               "attribution_s": attr_wall, "attribution_cpu_s": attr_cpu,
               "metrics_s": met_wall, "metrics_cpu_s": met_cpu,
               "metrics_x": _ratio(met_wall, attr_wall), "metrics_cpu_x": _ratio(met_cpu, attr_cpu),
               "metrics_goal": METRICS_GOAL,
               "by_metric_s": {m: default.rows[0][f"{m}_s"] for m in DEFAULT_METRICS},
               "sensitivity_s": sens_wall, "sensitivity_cpu_s": sens_cpu,
               "sensitivity_x": _ratio(sens_wall, attr_wall), "sensitivity_cpu_x": _ratio(sens_cpu, attr_cpu),
               "sensitivity_goal": sens_goal, "sensitivity_max": sens.rows[0]["sensitivity_max"]}
        if one_by_one:
            def explain_fn(xp):
                return torch.from_numpy(session.attribute(name, result.params, inputs=xp.cpu()).attribution)
            slow, slow_wall, slow_cpu = measured(lambda: evaluate_maps(
                session.volume, {name: result.attribution}, session.score, metrics="sensitivity", params=params,
                stats=session.stats, explain_fns={name: explain_fn}, seed=session.options.seed, region=session.region))
            row.update(sensitivity_one_by_one_s=slow_wall, sensitivity_one_by_one_cpu_s=slow_cpu,
                       sensitivity_one_by_one_max=slow.rows[0]["sensitivity_max"])
        rows.append(row)
        print(format_metrics_row(row), flush=True)
    return {"size": list(array.shape[1:]), "windows": len(session.windows), "active_windows": len(session.active),
            "batch_size": session.batch_size, "precision": session.precision, "segmentation_s": seg_s,
            "n_sensitivity": int(n_sensitivity), "metrics": list(DEFAULT_METRICS), "rows": rows,
            "score_counters": session.score_counters, "load_average_end": load_average(),
            "threads": torch.get_num_threads()}


METRICS_HEADER = (f"{'method':>20} {'attr s':>8} {'cpu s':>7} {'metrics s':>10} {'cpu s':>7} {'x attr':>7} "
                  f"{'x cpu':>6} {'goal':>5} {'sens s':>8} {'cpu s':>7} {'x attr':>7} {'x cpu':>6} {'goal':>5} "
                  f"{'1-by-1 s':>9} {'cpu s':>7}  precision")


def format_metrics_row(r: Dict[str, Any]) -> str:
    return (f"{r['method']:>20} {r['attribution_s']:8.2f} {r['attribution_cpu_s']:7.2f} {r['metrics_s']:10.2f} "
            f"{r['metrics_cpu_s']:7.2f} {_fmt(r['metrics_x']):>7} {_fmt(r['metrics_cpu_x']):>6} {r['metrics_goal']:5.1f} "
            f"{r['sensitivity_s']:8.2f} {r['sensitivity_cpu_s']:7.2f} {_fmt(r['sensitivity_x']):>7} "
            f"{_fmt(r['sensitivity_cpu_x']):>6} {r['sensitivity_goal']:5.1f} {_fmt(r.get('sensitivity_one_by_one_s')):>9} "
            f"{_fmt(r.get('sensitivity_one_by_one_cpu_s')):>7}  {r['precision']}")


def format_metrics_cost(report: Dict[str, Any]) -> str:
    lines = [f"Metrics cost on {'x'.join(map(str, report['size']))} ({report['windows']} windows, "
             f"{report['active_windows']} in the region, batch {report['batch_size']}, {report['precision']}, "
             f"{report['threads']} thread(s)); default metrics: {', '.join(report['metrics'])}; sensitivity "
             f"{report['n_sensitivity']} samples; wall and process CPU seconds", METRICS_HEADER]
    lines += [format_metrics_row(r) for r in report["rows"]]
    lines.append(f"  (load average {report['load_average_end']})")
    return "\n".join(lines)


def run_extras(args) -> Dict[str, Any]:
    """`--quick-look` / `--metrics-cost`: run, print, and write them into the JSON report."""
    from .benchmark import pick_device
    from .models import load_default_model

    device = pick_device(args.device)
    loaded = load_default_model()
    report: Dict[str, Any] = {"command": "esegeta bench " + " ".join(getattr(args, "argv", None) or []),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "threads": torch.get_num_threads()}
    precision = getattr(args, "precision", "auto")
    if getattr(args, "metrics_cost", False):
        methods = [m for m in (args.metrics_cost_methods or ",".join(METRICS_COST_METHODS)).split(",") if m]
        print(METRICS_HEADER, flush=True)
        report["metrics_cost"] = metrics_cost(loaded, device, args.metrics_cost_size, precision, methods,
                                              args.sensitivity_samples, args.sensitivity_one_by_one, args.patch_size)
        print(format_metrics_cost(report["metrics_cost"]), flush=True)
        _write(args.json_path, report)
    if getattr(args, "quick_look", False):
        report["quick_look"] = quick_look(loaded, device, args.quick_look_size, precision, patch_size=args.patch_size)
        print(format_quick_look(report["quick_look"]), flush=True)
        _write(args.json_path, report)
    print(f"\nwrote {args.json_path}")
    return report


def _write(path: str, report: Dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
