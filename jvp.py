"""Jacobian-vector products for the distillation losses, from the same forward pass as the value.

EMD needs dF/dt = J_F (v, 1, 0) and LMD needs dF/ds = J_F (0, 0, 1) at exactly the point where the
trainable forward F_theta(x_t, t, s) is evaluated, with the same weights (theta^- = theta). So one
forward pass can give both:

    F, dF = value_and_jvp(lambda x, t, s: net(x, t, s), (x_t, t, s), (v, ones, None))   # None: zero

F is what net(x_t, t, s) returns, with its autograd graph; dF is J_F u, detached. A flow-matching
step costs a forward and a backward, about 3 forward-units; this adds only the tangent (about 1
unit of convolution FLOPs), where a separate JVP pass of the stop-gradient network would also
recompute the primal (bench.py times both).

How: forward-mode AD with dual numbers (torch.autograd.forward_ad carries a tangent on each
tensor) and our own tangent rule for each operation the networks use (TangentRules below). The
primal of every operation runs as usual, recording the graph for the backward; its tangent is
computed under no_grad from the primal inputs and output. PyTorch's built-in forward-mode rules
would instead record the tangent's computation in the graph too (the weights require grad), which
costs memory (3.6x a flow-matching step's) and time; they also convolve the input with an all-zero
weight tangent, and route scalar products through zero tensors. An operation without a rule here
falls back to PyTorch's own rule: still exact, just slower (counted in FALLBACKS; tests/ check that
the U-Net and the toy MLP never need it).

method="fd" gives central differences, (fn(p + h u) - fn(p - h u)) / 2h with error O(h^2), for a
network with layers nobody wrote a rule for; it costs two extra forwards.
"""
import collections
import warnings

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as nnf
from torch.overrides import TorchFunctionMode

T = torch.Tensor
FALLBACKS = collections.Counter()        # operations that used PyTorch's forward-mode rule, by name


def value_and_jvp(fn, primals, tangents, method="exact", h=1e-3):
    """(fn(*primals), J fn(primals) . tangents): the value as fn gives it (with its autograd graph
    when grad is enabled), the tangent without graph. primals: a tuple of tensors; tangents: a
    tuple of tensors, or None for a zero tangent (that input then costs no tangent work at all)."""
    if method == "exact":
        with fwAD.dual_level() as level:
            with TangentRules(level):
                out = fn(*[p if u is None else fwAD.make_dual(p, u) for p, u in zip(primals, tangents)])
            out, tangent = fwAD.unpack_dual(out)
        return out, torch.zeros_like(out) if tangent is None else tangent     # None: out ignores the primals
    if method == "fd":
        out = fn(*primals)
        with torch.no_grad():
            plus = fn(*[p if u is None else p + h * u for p, u in zip(primals, tangents)])
            minus = fn(*[p if u is None else p - h * u for p, u in zip(primals, tangents)])
        return out, (plus - minus) / (2 * h)
    raise ValueError(f"unknown JVP method {method!r}; use 'exact' or 'fd'")


# ----------------------------------------------------------------------------------------------
# Tangent rules. Each takes (func, out, P, D, kw): the operation, its output (primal), the primal
# positional arguments P and their tangents D (None where an argument carries none), the keyword
# arguments; it returns the tangent of out, J_func(P) . D.

def _tangent_or_zeros(p, d):
    """The tangent of a tensor argument, zeros if it has none; lists element-wise (torch.cat)."""
    if isinstance(p, (list, tuple)):
        return type(p)(_tangent_or_zeros(pi, di) for pi, di in zip(p, d or [None] * len(p)))
    return torch.zeros_like(p) if d is None else d


def _linear(func, out, P, D, kw):
    """Reshapes, slices, reductions, pooling, concatenation: linear in the first argument, so the
    tangent is func applied to its tangent, the other arguments (shapes, dims, indices) as they are."""
    return func(_tangent_or_zeros(P[0], D[0]), *P[1:], **kw)


def _product(func, out, P, D, kw):
    """Multilinear products (mul, matmul, outer, einsum): the product rule, one term per argument
    with a tangent, the others at their primal values. Scalars are constants."""
    if func is torch.einsum:                            # einsum(equation, *operands)
        equation, P, D = P[0], P[1:], D[1:]
        func = lambda *operands: torch.einsum(equation, *operands)     # noqa: E731
    terms = [func(*P[:i], D[i], *P[i + 1:], **kw) for i in range(len(P)) if D[i] is not None]
    return sum(terms[1:], terms[0])


def _conv_or_linear(func, out, P, D, kw):
    """conv2d / linear (x, w, b): with constant w and b the map is affine in x, tangent func(dx, w)."""
    if any(d is not None for d in D[1:]):
        return NotImplemented                           # dual weights: never in our losses
    kw = {k: v for k, v in kw.items() if k != "bias"}
    return func(D[0], P[1], None, *P[3:], **kw)


def _add_sub(sign):
    """a + alpha b or a - alpha b, where either may be a constant (tensor or scalar)."""
    def rule(func, out, P, D, kw):
        da, db, scale = D[0], D[1] if len(D) > 1 else None, sign * kw.get("alpha", 1)
        if db is not None and scale != 1:
            db = scale * db
        tangent = db if da is None else da if db is None else da + db
        return tangent.expand(out.shape)                # a constant's broadcast can make out larger
    return rule


def _lerp(func, out, P, D, kw):
    """lerp(a, b, w) = a + w (b - a) with a constant weight w: linear in (a, b) together."""
    if len(D) > 2 and D[2] is not None:
        return NotImplemented
    return torch.lerp(_tangent_or_zeros(P[0], D[0]), _tangent_or_zeros(P[1], D[1]), P[2]).expand(out.shape)


def _div(func, out, P, D, kw):
    """a / b: (da - (a / b) db) / b."""
    if kw:
        return NotImplemented                           # rounding_mode: not a plain quotient
    if D[1] is None:
        return D[0] / P[1]
    numerator = -out * D[1] if D[0] is None else D[0] - out * D[1]
    return numerator / P[1]


def _pow(func, out, P, D, kw):
    """x ** e for a constant number e: e x^(e - 1) dx."""
    if not isinstance(P[1], (int, float)):
        return NotImplemented
    return (P[1] * P[0] ** (P[1] - 1)) * D[0]


def _softmax(func, out, P, D, kw):
    """y = softmax(x) along dim: dy = y * (dx - sum(y * dx, dim))."""
    dim = kw.get("dim", P[1] if len(P) > 1 else None)
    y_dx = out * D[0]
    return y_dx - out * y_dx.sum(dim, keepdim=True)


def _elementwise(derivative):
    """A function of one tensor applied element by element: dy = f'(x) dx, f' from (x, y)."""
    def rule(func, out, P, D, kw):
        return derivative(P[0], out) * D[0]
    return rule


def _clamp(func, out, P, D, kw):
    """clamp(x, lo, hi) with constant bounds: dx where lo <= x <= hi, 0 where x was clipped."""
    lo = P[1] if len(P) > 1 else kw.get("min")
    hi = P[2] if len(P) > 2 else kw.get("max")
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        return NotImplemented
    inside = torch.ones_like(P[0], dtype=torch.bool)
    inside = inside if lo is None else inside & (P[0] >= lo)
    inside = inside if hi is None else inside & (P[0] <= hi)
    return D[0] * inside


def _constant(func, out, P, D, kw):
    """ones_like and friends: the output does not depend on the input's values."""
    return None


RULES = {
    **dict.fromkeys([T.__getitem__, T.reshape, T.view, T.flatten, T.transpose, T.permute, T.unbind, T.contiguous,
                     T.mean, T.sum, T.to, T.neg,
                     torch.cat, nnf.avg_pool2d, nnf.interpolate], _linear),
    **dict.fromkeys([T.mul, T.matmul, torch.outer, torch.einsum], _product),
    **dict.fromkeys([nnf.conv2d, nnf.linear], _conv_or_linear),
    T.add: _add_sub(+1), T.sub: _add_sub(-1),
    T.__rsub__: lambda func, out, P, D, kw: -D[0],                      # c - x
    **dict.fromkeys([T.lerp, torch.lerp], _lerp),
    T.div: _div,
    T.__rdiv__: lambda func, out, P, D, kw: (-out / P[0]) * D[0],       # c / x
    **dict.fromkeys([T.pow, T.__pow__], _pow),
    T.softmax: _softmax,
    nnf.silu: lambda func, out, P, D, kw: torch.ops.aten.silu_backward(D[0], P[0]),   # one fused kernel
    **dict.fromkeys([T.cos, torch.cos], _elementwise(lambda x, y: -torch.sin(x))),
    **dict.fromkeys([T.sin, torch.sin], _elementwise(lambda x, y: torch.cos(x))),
    **dict.fromkeys([T.sqrt, torch.sqrt], _elementwise(lambda x, y: 0.5 / y)),
    **dict.fromkeys([T.rsqrt, torch.rsqrt], _elementwise(lambda x, y: -0.5 * y ** 3)),
    **dict.fromkeys([T.square, torch.square], _elementwise(lambda x, y: 2 * x)),
    **dict.fromkeys([T.log, torch.log], _elementwise(lambda x, y: 1 / x)),
    **dict.fromkeys([T.log1p, torch.log1p], _elementwise(lambda x, y: 1 / (1 + x))),
    **dict.fromkeys([T.clamp, torch.clamp], _clamp),
    **dict.fromkeys([torch.ones_like, torch.zeros_like], _constant),
}


def _as_dtype(tangent, out):
    """Under autocast a rule can return float32 for a bf16 output (or back): the tangent follows out."""
    return tangent if tangent.dtype == out.dtype else tangent.to(out.dtype)


class TangentRules(TorchFunctionMode):
    """Inside a fwAD.dual_level: every operation with a dual input runs its primal as usual (graph
    recorded if grad is enabled) and gets its tangent from RULES, computed without graph."""

    def __init__(self, level):
        super().__init__()
        self.level = level

    def split(self, a):
        """(primal, tangent or None) of an argument; lists of tensors element-wise."""
        if isinstance(a, torch.Tensor):
            return torch._unpack_dual(a, self.level)    # fwAD.unpack_dual without its Python checks
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            pairs = [torch._unpack_dual(x, self.level) for x in a]
            tangents = [d for _, d in pairs]
            return type(a)(p for p, _ in pairs), tangents if any(d is not None for d in tangents) else None
        return a, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = RULES.get(func)
        split = [self.split(a) for a in args]
        if all(d is None for _, d in split):            # no tangent in: an ordinary operation
            return func(*args, **kwargs)
        if rule is None or any(self.split(v)[1] is not None for v in kwargs.values()):
            return self.fallback(func, args, kwargs)
        P, D = [p for p, _ in split], [d for _, d in split]
        out = func(*P, **kwargs)                        # the primal, with graph
        with torch.no_grad():
            tangent = rule(func, out, P, D, kwargs)
        if tangent is NotImplemented:                   # a case the rule does not cover: redo it
            return self.fallback(func, args, kwargs)
        if tangent is None:
            return out
        if isinstance(out, torch.Tensor):                # fwAD.make_dual without its Python checks:
            return torch._make_dual(out, _as_dtype(tangent, out), level=self.level)
        return type(out)(torch._make_dual(o, _as_dtype(d, o), level=self.level) for o, d in zip(out, tangent))

    @staticmethod
    def fallback(func, args, kwargs):
        """PyTorch's own forward-mode rule; tensor results are counted (x.shape and the like are not)."""
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        if outs and all(isinstance(o, torch.Tensor) for o in outs):
            name = getattr(func, "__name__", str(func))
            if not FALLBACKS[name]:
                warnings.warn(f"jvp.py has no tangent rule for {name!r}: PyTorch's forward-mode rule is used "
                              f"(exact, but with grad enabled it records the tangent in the graph: slower, "
                              f"more memory). Add a rule to jvp.RULES.", stacklevel=2)
            FALLBACKS[name] += 1
        return out
