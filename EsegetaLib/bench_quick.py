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
from typing import Any, Dict, List, Optional, Tuple

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


PASS_KINDS = ("fwd_bwd", "fwd", "fwd_fp32", "fwd_bwd_fp32")


def pass_seconds(session, backward: bool, full_precision: bool = False) -> Tuple[float, float]:
    """(wall, CPU) seconds per window of one pass at the session's batch size: forward+backward
    (`backward`) or forward without gradient, in the session's precision or (`full_precision`) with
    autocast off; the best of two timed batches after a warm-up (the floor's units)."""
    from .benchmark import _sync, fwd_bwd_step
    from .device import autocast

    batch = max(1, int(session.batch_size))
    x = torch.randn((batch, session.volume.shape[0]) + tuple(session.grid.patch), device=session.device)
    best_wall = best_cpu = math.inf
    with autocast(session.device, None if full_precision else session.amp_dtype):
        for repeat in range(3):
            _sync(session.device)
            wall, cpu = time.perf_counter(), time.process_time()
            fwd_bwd_step(session.network, x, backward)
            _sync(session.device)
            if repeat:  # the first is the warm-up
                best_wall = min(best_wall, time.perf_counter() - wall)
                best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall / batch, best_cpu / batch


class UnitCosts(dict):
    """(wall, CPU) seconds per window of each kind of pass (PASS_KINDS), measured when first asked."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def __missing__(self, kind: str) -> Tuple[float, float]:
        value = self[kind] = pass_seconds(self.session, kind.startswith("fwd_bwd"), kind.endswith("fp32"))
        return value


class PassCounter:
    """Windows the network processes while active, per kind of pass (a forward pre-hook on the
    network; each sample of a batch is one window pass): 'fwd_bwd' (gradient enabled: the forward
    of a gradient evaluation, whose backward follows), 'fwd' (no gradient, the run's precision),
    'fwd_fp32' (no gradient, autocast off while the run uses it). `segment` names the part of the
    work being counted (e.g. the metric running), so one pass can be split by metric."""

    def __init__(self, network: torch.nn.Module, session=None):
        self.network, self.session = network, session
        self.counts: Dict[str, Dict[str, int]] = {}
        self.segment = "all"
        self.handle = None

    def __enter__(self) -> "PassCounter":
        self.handle = self.network.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _hook(self, module, args) -> None:
        x = args[0] if args else None
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1
        reduced = self.session is not None and self.session.precision in ("bf16", "fp16")
        full = reduced and not torch.is_autocast_enabled(x.device.type if x is not None else "cpu")
        kind = ("fwd_bwd" if torch.is_grad_enabled() else "fwd") + ("_fp32" if full else "")
        seg = self.counts.setdefault(self.segment, dict.fromkeys(PASS_KINDS, 0))
        seg[kind] += n

    def total(self) -> Dict[str, int]:
        out = dict.fromkeys(PASS_KINDS, 0)
        for seg in self.counts.values():
            for k, v in seg.items():
                out[k] += v
        return out


def floors(counts: Dict[str, int], units: Dict[str, Tuple[float, float]]) -> Dict[str, float]:
    """The floor (forward+backward passes x their cost: each gradient evaluation is one fwd+bwd),
    and the minimum with every counted pass (+ forwards x their cost), wall and CPU seconds."""
    grad = [(counts[k], units[k]) for k in ("fwd_bwd", "fwd_bwd_fp32") if counts.get(k)]
    rest = [(counts[k], units[k]) for k in ("fwd", "fwd_fp32") if counts.get(k)]
    out = {"floor_s": sum(n * u[0] for n, u in grad), "floor_cpu_s": sum(n * u[1] for n, u in grad)}
    out["min_s"] = out["floor_s"] + sum(n * u[0] for n, u in rest)
    out["min_cpu_s"] = out["floor_cpu_s"] + sum(n * u[1] for n, u in rest)
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def quick_look(loaded, device: torch.device, size: str = QUICK_LOOK_SIZE, precision: str = "auto",
               methods=QUICK_LOOK_METHODS, patch_size=None) -> Dict[str, Any]:
    """One session, the quick-look methods at their defaults; figures and ratios (see module doc).
    Each method's window passes are counted (PassCounter); its floor is its forward+backward passes
    x the measured cost of one (each gradient evaluation is one), its minimum adds its forwards."""
    from .benchmark import _warm_up, environment, load_average

    _warm_up(loaded, methods, device)  # imports, lazy initialisation, kernels: once per process, untimed
    session, (seg_s, seg_cpu), array = _session(loaded, size, device, precision, patch_size)
    n_windows, n_active = len(session.windows), len(session.active)
    units = UnitCosts(session)
    reduced = session.precision in ("bf16", "fp16")
    # the segmentation: one forward per window, + the determinism check's two full-precision forwards
    seg_counts = dict.fromkeys(PASS_KINDS, 0)
    seg_counts["fwd"] = n_windows
    seg_counts["fwd_fp32" if reduced else "fwd"] += 2
    seg_min = floors(seg_counts, units)
    seg_min.update(floor_s=seg_min["min_s"], floor_cpu_s=seg_min["min_cpu_s"])
    rows: List[Dict[str, Any]] = [{"step": "segmentation", "seconds": seg_s, "cpu_s": seg_cpu, **seg_min,
                                   "passes": seg_counts, "precision": session.precision,
                                   "note": "floor = its forwards; + volume statistics, blending, determinism check"}]
    for name in methods:
        with PassCounter(session.network, session) as counter:
            result, _, cpu_s = measured(lambda: session.attribute(name))
        counts = counter.total()
        note = []
        if "steps_used_mean" in result.diagnostics:
            note.append(f"adaptive: {result.diagnostics['steps_used_mean']:.1f} gradient evaluations/window "
                        f"(max {result.diagnostics.get('steps_used_max')})")
        elif name == "IntegratedGradients":
            note.append(f"{result.params.get('n_steps')} fixed steps")
        if result.diagnostics.get("reduced_precision_seconds") is not None:
            note.append("bf16 lost completeness: rerun in fp32 (counted)")
        if name == "GradCAM":
            note.append("backward stops at the layer: the floor is an upper bound")
        checks = {c.name: c.status for c in result.checks}
        rows.append({"step": name, "seconds": result.seconds, "cpu_s": cpu_s, **floors(counts, units),
                     "passes": counts, "precision": result.diagnostics.get("precision"),
                     "completeness": result.diagnostics.get("relative_convergence_delta"),
                     "checks": checks, "note": "; ".join(note)})
        del result
        print(f"{name}: {rows[-1]['seconds']:.2f} s ({cpu_s:.2f} CPU s), floor {rows[-1]['floor_s']:.2f} s "
              f"({rows[-1]['floor_cpu_s']:.2f} CPU s), passes {counts}", flush=True)
    total = sum(r["seconds"] for r in rows)
    total_cpu = sum(r["cpu_s"] for r in rows)
    for r in rows:
        r["x_floor"] = _ratio(r["seconds"], r["floor_s"])
        r["x_floor_cpu"] = _ratio(r["cpu_s"], r["floor_cpu_s"])
        r["x_min_cpu"] = _ratio(r["cpu_s"], r["min_cpu_s"])
        r["min_over_floor"] = _ratio(r["min_cpu_s"], r["floor_cpu_s"])
    _per_saliency_pass(rows)
    threads = torch.get_num_threads()
    return {"size": list(array.shape[1:]), "device": str(device), "precision_requested": precision,
            "precision": session.precision, "precision_reason": session.precision_reason,
            "patch": list(session.grid.patch), "windows": n_windows, "active_windows": n_active,
            "batch_size": session.batch_size, "unit_costs": {k: list(v) for k, v in units.items()},
            "fwd_bwd_per_window_s": units["fwd_bwd"][0], "fwd_per_window_s": units["fwd"][0],
            "rows": rows, "total_s": total, "total_cpu_s": total_cpu,
            # on an idle machine the threads would be busy all the time: CPU seconds / threads
            "idle_wall_estimate_s": total_cpu / max(1, threads),
            "threads": threads, "budget_s": QUICK_LOOK_BUDGET_S, "floor_goal": FLOOR_GOAL,
            "within_budget": total <= QUICK_LOOK_BUDGET_S,
            "idle_estimate_within_budget": total_cpu / max(1, threads) <= QUICK_LOOK_BUDGET_S,
            "every_method_within_floor_goal": all((r["x_floor"] or math.inf) <= FLOOR_GOAL for r in rows[1:]),
            "every_method_within_floor_goal_cpu": all((r["x_floor_cpu"] or math.inf) <= FLOOR_GOAL for r in rows[1:]),
            "every_method_within_saliency_pass_goal": all((r["x_saliency_pass"] or math.inf) <= FLOOR_GOAL
                                                          for r in rows[1:] if r.get("x_saliency_pass") is not None),
            "load_average_end": load_average(), "environment": environment()}


def _per_saliency_pass(rows: List[Dict[str, Any]]) -> None:
    """`x_saliency_pass(_cpu)`: each method's time over its forward+backward passes x Saliency's
    measured time per pass in the same run. Saliency is nothing but those passes, so this floor is
    taken under the run's own conditions; on a loaded machine the timed single batch of the unit
    costs (the best of two, often in a quiet moment) makes the other floor optimistic."""
    saliency = next((r for r in rows if r["step"] == "Saliency" and r["passes"].get("fwd_bwd")), None)
    for r in rows:
        fb = r["passes"].get("fwd_bwd", 0) + r["passes"].get("fwd_bwd_fp32", 0)
        if saliency is None or not fb or r["step"] == "segmentation":
            r["x_saliency_pass"] = r["x_saliency_pass_cpu"] = None
            continue
        n = saliency["passes"]["fwd_bwd"]
        r["x_saliency_pass"] = _ratio(r["seconds"], fb * saliency["seconds"] / n)
        r["x_saliency_pass_cpu"] = _ratio(r["cpu_s"], fb * saliency["cpu_s"] / n)


def _passes(counts: Dict[str, int]) -> str:
    names = {"fwd_bwd": "fb", "fwd": "f", "fwd_fp32": "f32", "fwd_bwd_fp32": "fb32"}
    return " ".join(f"{counts[k]}{names[k]}" for k in PASS_KINDS if counts.get(k)) or "0"


def format_quick_look(report: Dict[str, Any]) -> str:
    u = report["unit_costs"]
    lines = [f"Quick look on {'x'.join(map(str, report['size']))} ({report['windows']} windows of "
             f"{'x'.join(map(str, report['patch']))}, {report['active_windows']} in the region, batch "
             f"{report['batch_size']}), {report['precision']} ({report['precision_reason']}); per window: "
             + ", ".join(f"{k} {v[0]:.3f} s ({v[1]:.3f} CPU s)" for k, v in u.items()),
             "passes: fb = forward+backward, f = forward, f32 = forward in fp32 (window passes); floor = fb x "
             "its cost; min = every counted pass x its cost; x sal = over fb x Saliency's time per pass in this run",
             f"{'step':>20} {'seconds':>9} {'cpu s':>8} {'floor s':>8} {'x floor':>8} {'floor cpu':>9} "
             f"{'x cpu':>6} {'min cpu':>8} {'x min':>6} {'x sal':>6} {'cpu':>5} {'goal':>6} {'passes':>14} "
             f"{'precision':>9}  note"]
    for r in report["rows"]:
        goal = "" if r["step"] == "segmentation" else f"<={report['floor_goal']:g}"
        lines.append(f"{r['step']:>20} {r['seconds']:9.2f} {r['cpu_s']:8.2f} {r['floor_s']:8.2f} {_fmt(r['x_floor']):>8} "
                     f"{r['floor_cpu_s']:9.2f} {_fmt(r['x_floor_cpu']):>6} {r['min_cpu_s']:8.2f} {_fmt(r['x_min_cpu']):>6} "
                     f"{_fmt(r.get('x_saliency_pass')):>6} {_fmt(r.get('x_saliency_pass_cpu')):>5} {goal:>6} {_passes(r['passes']):>14} {str(r.get('precision')):>9}  {r.get('note', '')}")
    lines.append(f"{'total':>20} {report['total_s']:9.2f} {report['total_cpu_s']:8.2f}  {report['threads']} thread(s); "
                 f"idle-machine estimate (CPU s / threads) {report['idle_wall_estimate_s']:.0f} s; budget "
                 f"{report['budget_s']:.0f} s: {'within' if report['within_budget'] else 'OVER'} (wall), "
                 f"{'within' if report['idle_estimate_within_budget'] else 'OVER'} (idle estimate); every method <= "
                 f"{report['floor_goal']:g}x floor: {'yes' if report['every_method_within_floor_goal'] else 'NO'} (wall), "
                 f"{'yes' if report['every_method_within_floor_goal_cpu'] else 'NO'} (CPU), "
                 f"{'yes' if report.get('every_method_within_saliency_pass_goal') else 'NO'} (x Saliency pass, wall); "
                 f"load {report['load_average_end']}")
    return "\n".join(lines)


METRICS_COST_METHODS = ("Saliency", "IntegratedGradients", "GradCAM")


class _MetricSegments:
    """A progress callback of `evaluate` that points a PassCounter at the metric running and
    records each metric's CPU seconds (evaluate labels its progress 'metric <name> of <method>')."""

    def __init__(self, counter: PassCounter):
        self.counter = counter
        self.cpu: Dict[str, float] = {}
        self._current, self._since = None, time.process_time()

    def __call__(self, fraction: float, message: str) -> None:
        name = message.split(" of ", 1)[0][len("metric "):] if message.startswith("metric ") else None
        if name and name != self._current:
            self.close()
            self._current, self.counter.segment = name, name

    def close(self) -> None:
        now = time.process_time()
        if self._current is not None:
            self.cpu[self._current] = self.cpu.get(self._current, 0.0) + now - self._since
        self._since = now


def metrics_cost(loaded, device: torch.device, size: str = "sample", precision: str = "auto",
                 methods=METRICS_COST_METHODS, n_sensitivity: int = 10, one_by_one: bool = False,
                 patch_size=None) -> Dict[str, Any]:
    """Per method, in one session: its attribution, its default metrics (own metric context, so it
    pays for infidelity's score changes itself), its sensitivity batched, and optionally one by one.
    Every pass is counted per metric (PassCounter): with the measured cost of each kind of pass,
    `best_x` is the lowest ratio to the attribution those counts allow (the metric's passes x their
    cost / the attribution's passes x theirs), so a goal below it is arithmetic, not waste."""
    from .benchmark import load_average
    from .metrics import DEFAULT_METRICS, evaluate, evaluate_maps

    session, (seg_s, _), array = _session(loaded, size, device, precision, patch_size)
    units = UnitCosts(session)
    params = {"sensitivity": {"n_samples": int(n_sensitivity)}}
    sens_goal = 1.0 + SENSITIVITY_SLOPE * int(n_sensitivity)
    rows = []
    for name in methods:
        session.attribute(name)  # warm-up of this method's code path (first calls initialise kernels)
        with PassCounter(session.network, session) as counter:
            result, attr_wall, attr_cpu = measured(lambda: session.attribute(name))
        attr_counts = counter.total()
        attr_min = floors(attr_counts, units)["min_cpu_s"]
        one = {name: result}
        with PassCounter(session.network, session) as counter:
            segments = _MetricSegments(counter)
            default, met_wall, met_cpu = measured(lambda: evaluate(session, one, metrics=list(DEFAULT_METRICS),
                                                                   progress=segments))
            segments.close()
        by_metric = {}
        for m in DEFAULT_METRICS:
            counts = counter.counts.get(m, dict.fromkeys(PASS_KINDS, 0))
            m_min = floors(counts, units)["min_cpu_s"]
            cpu = segments.cpu.get(m, 0.0)
            by_metric[m] = {"seconds": default.rows[0][f"{m}_s"], "cpu_s": cpu, "passes": counts,
                            "x_attribution_cpu": _ratio(cpu, attr_cpu), "best_x": _ratio(m_min, attr_min)}
        met_counts = counter.total()
        with PassCounter(session.network, session) as counter:
            sens, sens_wall, sens_cpu = measured(lambda: evaluate(session, one, metrics="sensitivity", params=params))
        sens_counts = counter.total()
        row = {"method": name, "precision": result.diagnostics.get("precision"),
               "attribution_s": attr_wall, "attribution_cpu_s": attr_cpu, "attribution_passes": attr_counts,
               "attribution_min_cpu_s": attr_min,
               "metrics_s": met_wall, "metrics_cpu_s": met_cpu, "metrics_passes": met_counts,
               "metrics_x": _ratio(met_wall, attr_wall), "metrics_cpu_x": _ratio(met_cpu, attr_cpu),
               "metrics_best_x": _ratio(floors(met_counts, units)["min_cpu_s"], attr_min),
               "metrics_goal": METRICS_GOAL, "by_metric": by_metric,
               "by_metric_s": {m: default.rows[0][f"{m}_s"] for m in DEFAULT_METRICS},
               "sensitivity_s": sens_wall, "sensitivity_cpu_s": sens_cpu, "sensitivity_passes": sens_counts,
               "sensitivity_x": _ratio(sens_wall, attr_wall), "sensitivity_cpu_x": _ratio(sens_cpu, attr_cpu),
               "sensitivity_best_x": _ratio(floors(sens_counts, units)["min_cpu_s"], attr_min),
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
            "unit_costs": {k: list(v) for k, v in units.items()},
            "score_counters": session.score_counters, "load_average_end": load_average(),
            "threads": torch.get_num_threads()}


METRICS_HEADER = (f"{'method':>20} {'attr s':>8} {'cpu s':>7} {'metrics s':>10} {'cpu s':>7} {'x attr':>7} "
                  f"{'x cpu':>6} {'best x':>6} {'goal':>5} {'sens s':>8} {'cpu s':>7} {'x attr':>7} {'x cpu':>6} "
                  f"{'best x':>6} {'goal':>5} {'1-by-1 s':>9} {'cpu s':>7}  precision")


def format_metrics_row(r: Dict[str, Any]) -> str:
    return (f"{r['method']:>20} {r['attribution_s']:8.2f} {r['attribution_cpu_s']:7.2f} {r['metrics_s']:10.2f} "
            f"{r['metrics_cpu_s']:7.2f} {_fmt(r['metrics_x']):>7} {_fmt(r['metrics_cpu_x']):>6} "
            f"{_fmt(r['metrics_best_x']):>6} {r['metrics_goal']:5.1f} "
            f"{r['sensitivity_s']:8.2f} {r['sensitivity_cpu_s']:7.2f} {_fmt(r['sensitivity_x']):>7} "
            f"{_fmt(r['sensitivity_cpu_x']):>6} {_fmt(r['sensitivity_best_x']):>6} {r['sensitivity_goal']:5.1f} "
            f"{_fmt(r.get('sensitivity_one_by_one_s')):>9} {_fmt(r.get('sensitivity_one_by_one_cpu_s')):>7}  "
            f"{r['precision']}")


def format_metrics_cost(report: Dict[str, Any]) -> str:
    u = report["unit_costs"]
    lines = [f"Metrics cost on {'x'.join(map(str, report['size']))} ({report['windows']} windows, "
             f"{report['active_windows']} in the region, batch {report['batch_size']}, {report['precision']}, "
             f"{report['threads']} thread(s)); default metrics: {', '.join(report['metrics'])}; sensitivity "
             f"{report['n_sensitivity']} samples; wall and process CPU seconds; per window: "
             + ", ".join(f"{k} {v[1]:.3f} CPU s" for k, v in u.items()),
             "best x: the lowest ratio to the attribution its counted passes allow (passes x measured cost)",
             METRICS_HEADER]
    lines += [format_metrics_row(r) for r in report["rows"]]
    lines.append(f"{'per metric':>20} {'passes':>16} {'cpu s':>7} {'x attr cpu':>10} {'best x':>7}")
    for r in report["rows"]:
        lines.append(f"{r['method']:>20} attribution {_passes(r['attribution_passes']):>12} "
                     f"{r['attribution_cpu_s']:7.2f}")
        for m, v in r["by_metric"].items():
            lines.append(f"{m:>20} {_passes(v['passes']):>16} {v['cpu_s']:7.2f} {_fmt(v['x_attribution_cpu']):>10} "
                         f"{_fmt(v['best_x']):>7}")
        lines.append(f"{'sensitivity':>20} {_passes(r['sensitivity_passes']):>16} {r['sensitivity_cpu_s']:7.2f} "
                     f"{_fmt(r['sensitivity_cpu_x']):>10} {_fmt(r['sensitivity_best_x']):>7}")
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
