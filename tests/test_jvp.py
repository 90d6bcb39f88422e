"""jvp.py: every tangent rule against float64 central differences, the whole networks against them
with no fallback to PyTorch's rules, and the one-pass contract: the value keeps exactly the graph of
a plain forward (nothing of the tangent's computation is recorded or saved)."""
import math

import pytest
import torch
import torch.nn.functional as nnf

import jvp
import toy2d
from jvp import FALLBACKS, value_and_jvp
from unet import PRESETS, UNet

f64 = dict(dtype=torch.float64)
g = torch.Generator().manual_seed(0)
A, B = torch.randn(2, 3, 4, 4, generator=g, **f64), torch.randn(2, 3, 4, 4, generator=g, **f64)
W, BIAS = torch.randn(5, 3, 3, 3, generator=g, **f64), torch.randn(5, generator=g, **f64)
W_LINEAR = torch.randn(5, 48, generator=g, **f64)
POS = torch.rand(2, 3, 4, 4, generator=g, **f64) + 0.5                   # for sqrt, rsqrt, 1 / x

# name: (function, its inputs); every input gets a random tangent. Each rule in jvp.RULES appears,
# with constants (scalars and tensors without tangent) mixed in the way the networks use them.
CASES = {
    "getitem":      (lambda a: a[:, 1:, None, :2], [A]),
    "reshape/view": (lambda a: a.reshape(2, -1).view(6, 16), [A]),
    "unbind":       (lambda a: torch.cat(a.unbind(1), dim=0), [A]),
    "mean/sum":     (lambda a: a.mean(dim=(1, 2), keepdim=True) + a.sum(3, keepdim=True), [A]),
    "to/neg":       (lambda a: -a.to(torch.float64), [A]),
    "cat + const":  (lambda a: torch.cat([a, torch.ones_like(a[:, :1])], dim=1), [A]),
    "pool/interp":  (lambda a: nnf.interpolate(nnf.avg_pool2d(a, 2), scale_factor=2, mode="nearest"), [A]),
    "mul":          (lambda a, b: a * b * 0.3 * B, [A, B]),
    "matmul/outer": (lambda a, b: a @ b.transpose(2, 3) + torch.outer(a[0, 0, 0], b[1, 1, 1]), [A, B]),
    "einsum":       (lambda a, b: torch.einsum("nchw,ncvw->nhv", a, b), [A, B]),
    "conv2d":       (lambda a: nnf.conv2d(a, W, BIAS, padding=1), [A]),
    "linear":       (lambda a: nnf.linear(a.flatten(1), W_LINEAR, BIAS), [A]),
    "add/sub":      (lambda a, b: (a + b).add(b, alpha=2) - 3 * a[:, :1] - B + 1 + a.sub(b, alpha=0.5), [A, B]),
    "broadcast":    (lambda a: a[:, :, :1, :1] + B, [A]),
    "rsub":         (lambda a: 1 - a, [A]),
    "lerp":         (lambda a, b: a.lerp(b, 0.3) + torch.lerp(a, B, 0.7) + B.lerp(a, POS), [A, B]),
    "div":          (lambda a, p: a / p + a / 0.6 + B / p + 2 / p, [A, POS]),
    "pow":          (lambda a: a ** 2 + a.pow(3), [A]),
    "softmax":      (lambda a: a.softmax(dim=3), [A]),
    "silu":         (lambda a: nnf.silu(a), [A]),
    "cos/sin":      (lambda a: torch.cos(a) + a.sin() + a.cos() + torch.sin(a), [A]),
    "sqrt/rsqrt":   (lambda p: p.sqrt() + torch.rsqrt(p) + torch.sqrt(p) + p.rsqrt(), [POS]),
    "square":       (lambda a: a.square() + torch.square(a), [A]),
}


def central_difference(fn, primals, tangents, h=1e-6):
    plus = fn(*[p + h * u for p, u in zip(primals, tangents)])
    minus = fn(*[p - h * u for p, u in zip(primals, tangents)])
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("name", CASES)
def test_rule_matches_central_differences(name):
    fn, primals = CASES[name]
    gen = torch.Generator().manual_seed(1)
    tangents = [torch.randn(p.shape, generator=gen, **f64) for p in primals]
    FALLBACKS.clear()
    out, tangent = value_and_jvp(fn, primals, tangents)
    torch.testing.assert_close(out, fn(*primals), rtol=0, atol=0)
    torch.testing.assert_close(tangent, central_difference(fn, primals, tangents), rtol=1e-7, atol=1e-8)
    assert not FALLBACKS, dict(FALLBACKS)


def test_an_operation_without_a_rule_falls_back_to_pytorch_and_stays_exact():
    FALLBACKS.clear()
    fn = lambda a: torch.tanh(a) * nnf.softplus(a)                             # noqa: E731
    u = torch.randn(A.shape, generator=torch.Generator().manual_seed(2), **f64)
    with pytest.warns(UserWarning, match="no tangent rule") as record:
        _, tangent = value_and_jvp(fn, (A,), (u,))
    assert ["tanh" in str(w.message) for w in record] == [True, False]        # tanh, then softplus
    torch.testing.assert_close(tangent, central_difference(fn, (A,), (u,)), rtol=1e-7, atol=1e-8)
    assert dict(FALLBACKS) == {"tanh": 1, "softplus": 1}


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown JVP method"):
        value_and_jvp(torch.sin, (A,), (A,), method="magic")


def tiny_student(**kwargs):
    gen = torch.Generator().manual_seed(3)
    net = UNet(img_resolution=16, num_classes=10, **PRESETS["tiny"], cond_s=True, cond_lam=True, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(0.5 + torch.rand([], generator=gen))                    # s and lam reach the blocks
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = 0.1 + 0.8 * torch.rand(2, generator=gen)
    cond = dict(label=nnf.one_hot(torch.tensor([3, 7]), 10).float(), lam=1 + 2 * torch.rand(2, generator=gen))
    return net, (x, t, 0.5 * t), cond


@pytest.mark.parametrize("numerics", ["ayf", "edm2"])
@pytest.mark.parametrize("along", ["dF/dt (v, 1, 0)", "dF/ds (0, 0, 1)"])
def test_unet_and_toy_mlp_need_no_fallback_and_match_central_differences(along, numerics):
    net, (x, t, s), cond = tiny_student(numerics=numerics)
    mlp = toy2d.student_from(toy2d.MLP(hidden=32, x_octaves=2), hidden=32, x_octaves=2)   # with x features
    with torch.no_grad():
        for branch in (mlp.embed_s, mlp.embed_lam):                             # zero at init
            branch.weight.copy_(torch.randn(branch.weight.shape, generator=g))
    xm, tm = torch.randn(5, 2, generator=g), torch.rand(5, generator=g)
    cases = [(net.double(), (x.double(), t.double(), s.double()), {k: v.double() for k, v in cond.items()}),
             (mlp.double(), (xm.double(), tm.double(), 0.3 * tm.double()),
              dict(label=toy2d.one_hot(torch.tensor([0, 1, 1, 0, 1])).double(), lam=1 + tm.double()))]
    for model, primals, c in cases:
        fn = lambda x, t, s: model(x, t, s, **c)                               # noqa: E731
        u = ((torch.randn(primals[0].shape, generator=g, **f64), torch.ones_like(primals[1]), torch.zeros_like(primals[2]))
             if along.startswith("dF/dt") else
             (torch.zeros_like(primals[0]), torch.zeros_like(primals[1]), torch.ones_like(primals[2])))
        FALLBACKS.clear()
        out, tangent = value_and_jvp(fn, primals, u)
        assert not FALLBACKS, dict(FALLBACKS)
        assert out.requires_grad and not tangent.requires_grad
        fd = central_difference(fn, primals, u).detach()
        assert ((tangent - fd).norm() / fd.norm()).item() < 1e-7


def saved_bytes(fn):
    """The bytes autograd saves for the backward while fn runs, and fn's result."""
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return total[0], out


@pytest.mark.filterwarnings("ignore:jvp.py has no tangent rule")              # RULES = {} at the end
def test_one_pass_records_the_graph_of_a_plain_forward_and_gives_its_gradient():
    """value_and_jvp's value is the plain forward: the same saved tensors for the backward (none of
    the tangent's), the same value and the same gradient, while PyTorch's own rules save more."""
    net, (x, t, s), cond = tiny_student()
    u = (torch.randn(x.shape, generator=g), torch.ones_like(t), torch.zeros_like(s))
    fn = lambda x, t, s: net(x, t, s, **cond)                                  # noqa: E731
    plain_bytes, plain = saved_bytes(lambda: fn(x, t, s))
    one_pass_bytes, (out, _) = saved_bytes(lambda: value_and_jvp(fn, (x, t, s), u))
    assert one_pass_bytes == plain_bytes
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    grads = [torch.autograd.grad(y.square().sum(), list(net.parameters())) for y in (plain, out)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():                                                       # no graph at all
        assert saved_bytes(lambda: value_and_jvp(fn, (x, t, s), u))[0] == 0
    with pytest.MonkeyPatch.context() as m:                                     # PyTorch's rules
        m.setattr(jvp, "RULES", {})
        assert saved_bytes(lambda: value_and_jvp(fn, (x, t, s), u))[0] > 1.5 * plain_bytes


def test_bf16_autocast_tangent_is_close_to_float32():
    net, (x, t, s), cond = tiny_student()
    u = (torch.randn(x.shape, generator=g), torch.ones_like(t), torch.zeros_like(s))
    fn = lambda x, t, s: net(x, t, s, **cond)                                  # noqa: E731
    with torch.no_grad():
        _, ref = value_and_jvp(fn, (x, t, s), u)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, tangent = value_and_jvp(fn, (x, t, s), u)
    assert tangent.dtype == out.dtype
    assert ((tangent.float() - ref).norm() / ref.norm()).item() < 0.05       # bf16: ~3 significant digits
    assert math.isfinite(tangent.float().norm().item())


@pytest.mark.parametrize("method", ["exact", "fd"])
def test_none_is_a_zero_tangent(method):
    fn = lambda a, b: a * b.sin() + b                                          # noqa: E731
    u = torch.randn(A.shape, generator=g, **f64)
    out, tangent = value_and_jvp(fn, (A, B), (u, None), method=method)
    ref_out, ref = value_and_jvp(fn, (A, B), (u, torch.zeros_like(B)), method=method)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(tangent, ref)
