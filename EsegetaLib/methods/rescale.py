"""DeepLift below autograd: a multiplier for every non-linear op, on any model format, or a refusal.

DeepLift (Shrikumar et al. 2017) replaces the gradient of each non-linearity y = f(a) by a multiplier
m with m * (a - a0) = f(a) - f(a0) between the input's and the reference's activations, so that the
attributions (x - x0) * dF/dx computed with these multipliers sum to F(x) - F(x0) ("summation to
delta").  Captum implements it with module hooks: it fails on activation modules called more than
once (MONAI DynUNet, SegResNet, UNETR), and silently keeps the plain gradient for PReLU, GELU, norm
layers, functional calls, TorchScript and exported programs.

Here the rule lives at PyTorch's dispatcher (`TorchDispatchMode`), which every model format reaches:
1. the reference x0 runs forward and the mode records, op by op, the inputs and outputs of every
   non-linear op (the "reference" pass);
2. the input x runs forward; the mode pairs each op with the reference's op at the same position
   (same op name, same shapes; otherwise the model's control flow depends on the data: refused),
   follows which tensors depend on x, and refuses before any backward pass an op on an x-dependent
   tensor that it has no rule for (naming the op);
3. the backward pass: the mode replaces the backward kernel of every recorded non-linear op by its
   multiplier, the average Jacobian of the op between a0 and a, so that each op satisfies
   summation to delta by itself:
   - elementwise activations (ReLU, LeakyReLU, PReLU, ELU/SELU/CELU, GELU, SiLU, Mish, Hardswish,
     Hardsigmoid, ReLU6/Hardtanh, Softplus, sigmoid, tanh): the rescale rule m = (f(a) - f(a0)) /
     (a - a0) in closed form, and the gradient where |a - a0| is negligible;
   - normalisation layers whose statistics come from the input (InstanceNorm, GroupNorm, LayerNorm,
     BatchNorm in training mode): not elementwise; an exact closed-form split of
     (a - mean) / sqrt(var + eps) into a product and the secant of the scalar 1/sqrt (see
     `RescaleRules._normalisation`), valid for any reference, also a constant one whose variance is 0.
     BatchNorm with running statistics is linear and needs no rule;
   - softmax (the probability score, attention): the average Jacobian int_0^1 J(a0 + t (a - a0)) dt
     by Gauss-Legendre quadrature (smooth, so exact to quadrature error);
   - products of two x-dependent tensors (attention q k^T and attn v, gates x * sigmoid(.), MONAI's
     composed Swish/Mish): the exact split d(uv) = mean(u) dv + du mean(v), i.e. the saved operands are
     replaced by the mean of their input and reference values in the product's backward;
   - max pooling: each window's change f(a) - f(a0) is routed to the argmax of the input or of the
     reference, whichever moved more, divided by that voxel's change (exact, overlapping windows too);
   - clamp (no backward kernel of its own: autograd masks the gradient with comparisons of the saved
     input and aten.where): the comparisons are recognised and the where gets the rescale rule.
Linear ops (convolutions, matrix products with weights, sums, pooling by averaging, interpolation,
padding, views) keep their gradient, which is their exact multiplier.

Attribution = (x - x0) * (the gradient with these multipliers).  The completeness check recomputes
F(x) - F(x0) and compares; the calling method refuses a map whose relative delta exceeds its
tolerance.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from ..errors import EsegetaError
from .guided import call_op

aten = torch.ops.aten

QUADRATURE_NODES = 16  # Gauss-Legendre nodes of softmax's average Jacobian

# Ops that are linear in their x-dependent tensor arguments (or only move data): gradient = multiplier.
LINEAR = frozenset({
    "convolution", "_convolution", "conv3d", "conv2d", "conv1d", "conv_transpose3d", "conv_transpose2d",
    "add", "add_", "sub", "sub_", "neg", "neg_", "rsub", "sum", "mean", "cumsum",
    "cat", "stack", "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t",
    "expand", "expand_as", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "slice", "select", "narrow",
    "index", "index_select", "gather", "split", "split_with_sizes", "chunk", "unbind", "flip", "roll",
    "repeat", "clone", "contiguous", "copy_", "detach", "alias", "lift_fresh", "lift_fresh_copy",
    "_to_copy", "to", "as_strided", "unfold", "pixel_shuffle", "pixel_unshuffle", "im2col", "col2im",
    "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "pad", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
    "_upsample_nearest_exact3d", "_upsample_nearest_exact2d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d", "empty_like", "zeros_like", "ones_like", "new_zeros", "new_ones",
    "new_empty", "new_empty_strided", "full_like", "fill_", "zero_", "dropout", "native_dropout",
    "feature_dropout", "alpha_dropout", "_native_batch_norm_legit_no_training", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride", "is_same_size",
    "_local_scalar_dense", "item", "linear", "_assert_tensor_metadata", "_assert_async", "_assert_scalar",
    "_functional_assert_async", "sym_constrain_range", "sym_constrain_range_for_size", "addmm", "mm", "bmm", "matmul", "baddbmm",
    "addbmm", "einsum", "mul", "mul_", "div", "div_", "where", "masked_fill", "masked_fill_", "tile",
    "type_as", "movedim", "swapaxes", "flatten", "unflatten", "channel_shuffle", "_unsafe_index",
})
# Ops that are linear only while at most one operand depends on x (bilinear otherwise).
BILINEAR = frozenset({"mul", "mul_", "mm", "bmm", "matmul", "einsum", "baddbmm", "addbmm", "addmm", "linear"})
# ... and ops linear only in their first operand (the divisor, the condition must not depend on x).
FIRST_OPERAND_ONLY = frozenset({"div", "div_", "where", "masked_fill", "masked_fill_"})

# elementwise activation: forward packet name -> (backward packet name, saved arg is "input"/"result").
ELEMENTWISE = {
    "relu": "threshold_backward", "relu_": "threshold_backward", "threshold": "threshold_backward",
    "threshold_": "threshold_backward", "leaky_relu": "leaky_relu_backward",
    "leaky_relu_": "leaky_relu_backward", "_prelu_kernel": "_prelu_kernel_backward",
    "elu": "elu_backward", "elu_": "elu_backward", "celu": "elu_backward", "celu_": "elu_backward",
    "selu": "elu_backward", "selu_": "elu_backward", "gelu": "gelu_backward", "gelu_": "gelu_backward",
    "silu": "silu_backward", "silu_": "silu_backward", "mish": "mish_backward", "mish_": "mish_backward",
    "hardswish": "hardswish_backward", "hardswish_": "hardswish_backward",
    "hardsigmoid": "hardsigmoid_backward", "hardsigmoid_": "hardsigmoid_backward",
    "hardtanh": "hardtanh_backward", "hardtanh_": "hardtanh_backward", "softplus": "softplus_backward",
    "sigmoid": "sigmoid_backward", "sigmoid_": "sigmoid_backward", "tanh": "tanh_backward",
    "tanh_": "tanh_backward", "log_sigmoid_forward": "log_sigmoid_backward",
}
ELEMENTWISE_BACKWARD = frozenset(ELEMENTWISE.values())
# clamp has no backward kernel: autograd masks the gradient with ge/le comparisons of the saved input
# and aten.where; the mode recognises those comparisons and rescales in the where (see _clamp_where).
CLAMP = frozenset({"clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_"})
_COMPARISONS = frozenset({"ge", "le", "gt", "lt"})
# Backward kernels whose saved tensor is (usually) the op's result, not its input.
RESULT_SAVED = frozenset({"threshold_backward", "sigmoid_backward", "tanh_backward", "_softmax_backward_data"})
# Non-elementwise ops with an average-Jacobian rule: forward packet -> backward packet.
AVERAGED = {
    "native_group_norm": "native_group_norm_backward",
    "native_layer_norm": "native_layer_norm_backward",
    "native_batch_norm": "native_batch_norm_backward",
    "_native_batch_norm_legit": "native_batch_norm_backward",
    "_softmax": "_softmax_backward_data",
    # CUDA: batch statistics through cuDNN / MIOpen (InstanceNorm, BatchNorm in training); their
    # backward takes (input, grad_output, weight, ...) and, with running statistics, autograd calls
    # native_batch_norm_backward instead (linear)
    "cudnn_batch_norm": "cudnn_batch_norm_backward",
    "miopen_batch_norm": "miopen_batch_norm_backward",
}
INPUT_FIRST_BACKWARD = frozenset({"cudnn_batch_norm_backward", "miopen_batch_norm_backward"})
MAX_POOL = {"max_pool2d_with_indices": "max_pool2d_with_indices_backward",
            "max_pool3d_with_indices": "max_pool3d_with_indices_backward"}
RULE_BACKWARD = ELEMENTWISE_BACKWARD | frozenset(AVERAGED.values()) | frozenset(MAX_POOL.values())


def _name(func) -> str:
    return getattr(getattr(func, "overloadpacket", func), "__name__", str(func))


def _tensors(values) -> List[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


def _key(t: torch.Tensor) -> Tuple[int, Tuple[int, ...], Tuple[int, ...]]:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _gauss_legendre(n: int):
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return [(float((t + 1) / 2), float(w / 2)) for t, w in zip(nodes, weights)]


class _Record:
    """One non-linear op of the input pass, with the same op of the reference pass."""

    __slots__ = ("name", "args", "out", "ref_args", "ref_out", "kind")

    def __init__(self, name, args, out, ref_args, ref_out, kind):
        self.name, self.args, self.out, self.ref_args, self.ref_out, self.kind = name, args, out, ref_args, ref_out, kind


def _detached(values):
    return [v.detach().clone() if isinstance(v, torch.Tensor) else
            ([t.detach().clone() if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, (list, tuple)) else v)
            for v in values]


class RescaleRules(TorchDispatchMode):
    """The dispatch mode of this module's DeepLift; see the module docstring for the three passes.

    Set `phase` to "reference", "input" then "backward" (the caller does, see `rescale_gradients`).
    After the input pass `unsupported` maps op names without a rule to their counts; after the backward
    `seen`/`changed` count the rule's backward calls and those it altered."""

    def __init__(self, nodes: int = QUADRATURE_NODES):
        super().__init__()
        self.phase = "reference"
        self.nodes = _gauss_legendre(nodes)
        self.reference: List[Tuple[str, Any, Any]] = []
        self.position = 0
        self.dependent = WeakTensorKeyDictionary()
        self.by_input: Dict[Tuple, _Record] = {}
        self.by_output: Dict[Tuple, _Record] = {}
        self.operands: Dict[Tuple, torch.Tensor] = {}  # bilinear operand key -> mean of input and reference
        self.records: List[_Record] = []
        self.keep: List[torch.Tensor] = []
        self.clamp_masks = WeakTensorKeyDictionary()  # backward masks of clamp inputs -> record
        self.unsupported: Dict[str, int] = {}
        self.mismatch: Optional[str] = None
        self.seen = 0
        self.changed = 0
        self.unpaired = 0

    # -- passes
    def mark(self, tensor: torch.Tensor) -> None:
        self.dependent[tensor] = True

    def _is_dep(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.dependent

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if self.phase == "backward":
            return self._backward(func, name, args, kwargs)
        inplace = name.endswith("_") and args and isinstance(args[0], torch.Tensor)
        tracked = name in ELEMENTWISE or name in AVERAGED or name in MAX_POOL or name in BILINEAR or name in CLAMP
        before = _detached(args) if (tracked and (inplace or self.phase == "reference")) else None
        out = call_op(func, args, kwargs)
        if self.phase == "reference":
            self.reference.append((name, before if tracked else None,
                                   _detached([out])[0] if tracked else None))
            return out
        self._pair_and_classify(func, name, args, kwargs, out, before)
        return out

    def _pair_and_classify(self, func, name, args, kwargs, out, before) -> None:
        k = self.position
        self.position += 1
        if k >= len(self.reference) or self.reference[k][0] != name:
            if self.mismatch is None:
                ref = self.reference[k][0] if k < len(self.reference) else "the end of the reference pass"
                self.mismatch = f"op {k} is aten.{name} for the input but aten.{ref} for the reference"
            return
        tensors = _tensors(args) + _tensors(kwargs.values())
        deps = [t for t in tensors if self._is_dep(t)]
        if not deps:
            return
        for t in _tensors([out]):
            self.dependent[t] = True
        _, ref_args, ref_out = self.reference[k]
        if name in ELEMENTWISE or name in AVERAGED or name in MAX_POOL or name in CLAMP:
            if name in ("native_batch_norm", "_native_batch_norm_legit", "cudnn_batch_norm", "miopen_batch_norm") \
                    and not self._batch_stats(name, args, kwargs):
                return  # running statistics: linear
            self._record(name, before if before is not None else list(args), out, ref_args, ref_out)
            return
        if name in BILINEAR:
            operands = [a for a in args[:3] if isinstance(a, torch.Tensor)]
            dep_ops = [a for a in operands if self._is_dep(a)]
            if len(dep_ops) >= 2:
                if name.endswith("_") or name in ("addmm", "baddbmm", "addbmm", "linear", "einsum"):
                    self.unsupported[f"aten.{name} of two activations"] = self.unsupported.get(f"aten.{name} of two activations", 0) + 1
                    return
                for i, a in enumerate(args[:2]):
                    ref = ref_args[i]
                    if isinstance(a, torch.Tensor) and isinstance(ref, torch.Tensor) and ref.shape == a.shape:
                        self.operands[_key(a)] = (a.detach() + ref) / 2
                        self.keep.append(a)  # alive until the end: its address must not be reused
                        self.seen += 1
                        self.changed += 1
            return
        if name in FIRST_OPERAND_ONLY:
            position = {"where": 0, "masked_fill": 1, "masked_fill_": 1}.get(name)
            rest = [t for t in tensors[1:] if self._is_dep(t)] if position is None else \
                [a for a in args[position:position + 1] if self._is_dep(a)]
            if rest:
                label = "aten.div by an activation" if name.startswith("div") else f"aten.{name} with an x-dependent condition"
                self.unsupported[label] = self.unsupported.get(label, 0) + 1
            return
        if name in LINEAR:
            return
        self.unsupported[f"aten.{name}"] = self.unsupported.get(f"aten.{name}", 0) + 1

    @staticmethod
    def _batch_stats(name, args, kwargs) -> bool:
        if name == "_native_batch_norm_legit" and len(args) in (6,):  # .no_stats overload
            return bool(args[3])
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        return bool(training)

    def _record(self, name, args, out, ref_args, ref_out) -> None:
        backward = "clamp" if name in CLAMP else (ELEMENTWISE.get(name) or AVERAGED.get(name) or MAX_POOL[name])
        rec = _Record(name, args, out, ref_args, ref_out, backward)
        self.records.append(rec)
        first_in = args[0]
        first_out = out[0] if isinstance(out, (tuple, list)) else out
        self.by_input[(backward,) + _key(first_in)] = rec
        self.by_output[(backward,) + _key(first_out)] = rec

    # -- backward pass
    def _find(self, kind: str, saved: torch.Tensor) -> Optional[_Record]:
        key = (kind,) + _key(saved)
        first, second = (self.by_output, self.by_input) if kind in RESULT_SAVED else (self.by_input, self.by_output)
        return first.get(key) or second.get(key)

    def _backward(self, func, name, args, kwargs):
        if name in RULE_BACKWARD and not (name == "native_batch_norm_backward" and not args[7]):
            saved = args[5] if name == "elu_backward" else (args[0] if name in INPUT_FIRST_BACKWARD else args[1])
            rec = self._find(name, saved) if isinstance(saved, torch.Tensor) else None
            if rec is None:
                self.unpaired += 1
                return func(*args, **kwargs)
            self.seen += 1
            if name in ELEMENTWISE_BACKWARD:
                return self._elementwise(func, rec, args, kwargs)
            if name in MAX_POOL.values():
                return self._max_pool(func, rec, args, kwargs)
            return self._averaged(func, rec, args, kwargs)
        if name in _COMPARISONS and isinstance(args[0], torch.Tensor):
            rec = self.by_input.get(("clamp",) + _key(args[0]))
            if rec is not None:
                mask = func(*args, **kwargs)
                self.clamp_masks[mask] = rec
                return mask
        if name == "where" and isinstance(args[0], torch.Tensor) and args[0] in self.clamp_masks:
            return self._clamp_where(func, self.clamp_masks[args[0]], args, kwargs)
        # autograd unpacks a saved *output* with aten.detach: that is not the product's own use of it
        if self.operands and name not in ("detach", "alias"):
            swapped = [self.operands.get(_key(a), a) if isinstance(a, torch.Tensor) else a for a in args]
            if any(s is not a for s, a in zip(swapped, args)):
                return func(*swapped, **kwargs)
        return call_op(func, args, kwargs)

    def _elementwise(self, func, rec: _Record, args, kwargs, original=None):
        """grad * (f(a) - f(a0)) / (a - a0) where a moved, the kernel's own gradient elsewhere;
        args[0] is grad_out; `original()` computes the kernel's result when `func(*args)` does not."""
        result = original() if original is not None else func(*args, **kwargs)
        grad_in = result[0] if isinstance(result, (tuple, list)) else result
        a, a0 = rec.args[0], rec.ref_args[0]
        y = rec.out[0] if isinstance(rec.out, (tuple, list)) else rec.out
        y0 = rec.ref_out[0] if isinstance(rec.ref_out, (tuple, list)) else rec.ref_out
        delta_in = (a.double() - a0.double())
        delta_out = (y.double() - y0.double())
        scale = 1.0 + a.double().abs() + a0.double().abs()
        moved = delta_in.abs() > 1e-6 * scale
        ratio = torch.where(moved, delta_out / torch.where(moved, delta_in, torch.ones_like(delta_in)),
                            torch.zeros_like(delta_in))
        new = torch.where(moved, args[0].double() * ratio, grad_in.double()).to(grad_in.dtype)
        if not torch.equal(new, grad_in):
            self.changed += 1
        if isinstance(result, (tuple, list)):
            return type(result)([new, *result[1:]])
        return new

    def _clamp_where(self, func, rec: _Record, args, kwargs):
        """where(in range, grad, 0), clamp's gradient, with the rescale rule instead (a mask built from
        two comparisons, ge and le, is the first one updated in place: the same tensor)."""
        self.seen += 1
        return self._elementwise(func, rec, (args[1],), {}, original=lambda: func(*args, **kwargs))

    def _averaged(self, func, rec: _Record, args, kwargs):
        """Normalisation layers: the exact closed-form split below; softmax: average Jacobian by
        Gauss-Legendre quadrature of its own backward formula."""
        result = func(*args, **kwargs)
        grad_out = args[1] if _name(func) in INPUT_FIRST_BACKWARD else args[0]
        grad_in = result[0] if isinstance(result, (tuple, list)) else result
        if rec.name == "_softmax":
            a, a0 = rec.args[0], rec.ref_args[0]
            dim = rec.args[1]
            g = grad_out.double()
            total = torch.zeros_like(g)
            for t, w in self.nodes:
                s = torch.softmax(a0.double() + t * (a.double() - a0.double()), dim)
                total += w * s * (g - (g * s).sum(dim, keepdim=True))
        else:
            total = self._normalisation(rec, grad_out)
        new = total.to(grad_in.dtype)
        self.changed += 1
        if isinstance(result, (tuple, list)):
            return type(result)([new, *result[1:]])
        return new

    @staticmethod
    def _normalisation(rec: _Record, grad_out: torch.Tensor) -> torch.Tensor:
        """Multiplier of y = w * (a - mean(a)) / sqrt(var(a) + eps) + b, rows normalised separately.

        With u = a - mean(a), s = mean(u^2), r = (s + eps)^-1/2 (input) and u0, s0, r0 (reference):
        u r - u0 r0 = r du + u0 dr exactly (a product), dr = k ds with the secant
        k = (r - r0) / (s - s0), and ds = mean((u + u0) du) exactly.  Transposed:
        g_u = r g + k (u + u0) / n * sum(g u0), then g_a = g_u - mean(g_u) (the centring).
        Exact for any reference.  The split takes the scale r of the input, not the mean of the two
        (Shapley's symmetric split): a constant reference window (variance 0, r0 = eps^-1/2 ~ 300)
        would otherwise multiply the multipliers by ~150 at every norm layer, and a deep net's
        attributions would become a float32 cancellation of 1e20-sized terms.  Computed in float64."""
        name, args = rec.name, rec.args
        a, a0, g = rec.args[0].double(), rec.ref_args[0].double(), grad_out.double()
        shape = a.shape
        if name == "native_group_norm":
            weight, n_batch, channels, groups, eps = args[1], args[3], args[4], args[6], args[7]
            if weight is not None:
                g = g * weight.double().view(1, channels, *([1] * (a.dim() - 2)))
            to_rows = lambda t: t.reshape(n_batch * groups, -1)  # noqa: E731
            from_rows = lambda t: t.reshape(shape)  # noqa: E731
        elif name == "native_layer_norm":
            normalized, weight, eps = args[1], args[2], args[4]
            if weight is not None:
                g = g * weight.double()
            width = int(np.prod(normalized))
            to_rows = lambda t: t.reshape(-1, width)  # noqa: E731
            from_rows = lambda t: t.reshape(shape)  # noqa: E731
        else:  # batch statistics: per channel over batch and space (InstanceNorm: a (1, B*C, ...) view)
            weight, eps = args[1], args[-1]
            if weight is not None:
                g = g * weight.double().view(1, -1, *([1] * (a.dim() - 2)))
            moved = (a.shape[1], a.shape[0]) + tuple(a.shape[2:])
            to_rows = lambda t: t.transpose(0, 1).reshape(a.shape[1], -1)  # noqa: E731
            from_rows = lambda t: t.reshape(moved).transpose(0, 1)  # noqa: E731
        x, x0, gr = to_rows(a), to_rows(a0), to_rows(g)
        width = x.shape[1]
        u, u0 = x - x.mean(1, keepdim=True), x0 - x0.mean(1, keepdim=True)
        s, s0 = (u * u).mean(1, keepdim=True), (u0 * u0).mean(1, keepdim=True)
        r, r0 = (s + eps).rsqrt(), (s0 + eps).rsqrt()
        ds = s - s0
        moved_s = ds.abs() > 1e-12 * (1.0 + s.abs() + s0.abs())
        k = torch.where(moved_s, (r - r0) / torch.where(moved_s, ds, torch.ones_like(ds)), -0.5 * r ** 3)
        g_u = r * gr + k * (u + u0) / width * (gr * u0).sum(1, keepdim=True)
        g_a = g_u - g_u.mean(1, keepdim=True)
        return from_rows(g_a).contiguous()

    def _max_pool(self, func, rec: _Record, args, kwargs):
        """Route each window's change to the argmax (of input or reference) that moved more."""
        result = func(*args, **kwargs)
        grad_out = args[0]
        a, a0 = rec.args[0], rec.ref_args[0]
        y, idx = rec.out
        y0, idx0 = rec.ref_out
        spatial = a.dim() - (2 if a.dim() == idx.dim() else 1)
        lead = a.shape[:a.dim() - spatial]
        flat = lambda t: t.reshape(*lead, -1)  # noqa: E731
        da = flat(a.double() - a0.double())
        i_x, i_0 = flat(idx), flat(idx0)
        d_x, d_0 = da.gather(-1, i_x), da.gather(-1, i_0)
        use_x = d_x.abs() >= d_0.abs()
        pos, den = torch.where(use_x, i_x, i_0), torch.where(use_x, d_x, d_0)
        dy = flat(y.double() - y0.double())
        scale = 1.0 + flat(y.double()).abs() + flat(y0.double()).abs()
        moved = den.abs() > 1e-6 * scale
        mult = torch.where(moved, dy / torch.where(moved, den, torch.ones_like(den)), torch.ones_like(den))
        pos = torch.where(moved, pos, i_x)
        grad = torch.zeros_like(da).scatter_add_(-1, pos, flat(grad_out.double()) * mult)
        new = grad.reshape(a.shape).to(result.dtype)
        if not torch.equal(new, result):
            self.changed += 1
        return new

    def diagnostics(self) -> Dict[str, Any]:
        return {"rule_calls_changed": self.changed, "rule_calls_seen": self.seen}


def _refuse_unsupported(mode: RescaleRules, method: str) -> None:
    if mode.mismatch:
        raise EsegetaError(
            f"{method} could not pair the input's and the reference's operations ({mode.mismatch}): the "
            "model's control flow depends on the data; use IntegratedGradients instead."
        )
    if mode.unsupported:
        names = ", ".join(sorted(mode.unsupported))
        raise EsegetaError(
            f"{method} has no rescale rule for {names} in this model, so its map would miss summation to "
            "delta; use IntegratedGradients (with its completeness check) instead."
        )


def rescale_gradients(forward: Callable, inputs: torch.Tensor, baselines: torch.Tensor,
                      forward_args: Sequence = (), method: str = "DeepLift",
                      layer: Optional[torch.nn.Module] = None):
    """DeepLift multipliers for `inputs` against `baselines` (both (B, C, *S)).

    Returns (multipliers (B, C, *S) (attribution = (inputs - baselines) * multipliers), diagnostics
    {"rule_calls_changed", "rule_calls_seen"}, layer_pair) where layer_pair = (A(x), A(x0), dF/dA with
    the rules) for `layer` (an nn.Module called once), else None.
    Raises EsegetaError naming the ops it has no rule for."""
    mode = RescaleRules()
    args = tuple(forward_args or ())
    store: Dict[str, List[torch.Tensor]] = {"reference": [], "input": []}
    handle = None
    if layer is not None:
        def hook(module, hook_args, output):
            store[mode.phase].append(output[0] if isinstance(output, (tuple, list)) else output)
        handle = layer.register_forward_hook(hook)
    try:
        # both passes with gradients on, so that the dispatcher picks the same kernels for both
        ref_in = baselines.detach().clone().requires_grad_(True)
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad(), mode:
            mode.phase = "reference"
            forward(ref_in, *args)
            mode.phase = "input"
            mode.mark(x)
            f_x = forward(x, *args)
            if mode.position != len(mode.reference) and mode.mismatch is None:
                mode.mismatch = f"the input ran {mode.position} ops, the reference {len(mode.reference)}"
            _refuse_unsupported(mode, method)
            if layer is not None and (len(store["input"]) != 1 or len(store["reference"]) != 1):
                raise EsegetaError(
                    f"{method}: the chosen layer runs {len(store['input'])} times per forward pass; choose a "
                    "layer that runs once (see the network's named modules)."
                )
            mode.phase = "backward"
            targets = [x] + ([store["input"][0]] if layer is not None else [])
            grads = torch.autograd.grad(f_x.sum(), targets, allow_unused=True)
    finally:
        if handle is not None:
            handle.remove()
    if mode.unpaired:
        raise EsegetaError(
            f"{method} met {mode.unpaired} non-linear backward call(s) it could not pair with the forward "
            "pass, so its map would miss summation to delta; use IntegratedGradients instead."
        )
    multipliers = grads[0] if grads[0] is not None else torch.zeros_like(inputs)
    layer_pair = None
    if layer is not None:
        g = grads[1] if grads[1] is not None else torch.zeros_like(store["input"][0])
        layer_pair = (store["input"][0].detach(), store["reference"][0].detach(), g)
    return multipliers.detach(), mode.diagnostics(), layer_pair
