"""unet.py: each test computes one thing two independent ways (CPU, tiny preset, a few seconds each)."""
import pytest
import torch

from unet import PRESETS, UNet, MPConv, init_student_from_teacher

N, CLASSES = 2, 10


def tiny(**kwargs):
    return UNet(num_classes=CLASSES, **PRESETS["tiny"], **kwargs).eval()


def randomize_gains(net, gen):
    """Give every scalar gain (0 at init) a value in [0.5, 1.5], so that t, s and lam reach the blocks."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(0.5 + torch.rand([], generator=gen))
    return net


def inputs(gen, dtype=torch.float32):
    x = torch.randn(N, 3, 64, 64, generator=gen, dtype=dtype)
    t = 0.1 + 0.8 * torch.rand(N, generator=gen, dtype=dtype)
    s = t * torch.rand(N, generator=gen, dtype=dtype)
    label = torch.nn.functional.one_hot(torch.randint(CLASSES, (N,), generator=gen), CLASSES).to(dtype)
    lam = 1 + 2 * torch.rand(N, generator=gen, dtype=dtype)
    return x, t, s, label, lam


def fd(fn, primals, tangents, h=1e-6):
    """Central finite differences in float64, error O(h^2)."""
    plus = fn(*[p + h * u for p, u in zip(primals, tangents)])
    minus = fn(*[p - h * u for p, u in zip(primals, tangents)])
    return (plus - minus) / (2 * h)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_jvp_teacher_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = randomize_gains(tiny(), gen).double()
    x, t, _, label, _ = inputs(gen, torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    velocity = lambda x, t: net(x, t, t, label)                          # the teacher: s = t
    primals, tangents = (x, t), (v, torch.ones_like(t))
    _, dv_dt = torch.func.jvp(velocity, primals, tangents)
    assert rel_err(dv_dt, fd(velocity, primals, tangents)) < 1e-6


@torch.no_grad()
def test_jvp_student_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    net = randomize_gains(tiny(cond_s=True, cond_lam=True), gen).double()
    x, t, s, label, lam = inputs(gen, torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    F = lambda x, t, s: net(x, t, s, label, lam)
    for tangents in [(v, torch.ones_like(t), torch.zeros_like(s)),         # dF/dt along the ODE (EMD)
                     (torch.zeros_like(x), torch.zeros_like(t), torch.ones_like(s))]:  # dF/ds (LMD)
        _, jvp = torch.func.jvp(F, (x, t, s), tangents)
        assert jvp.abs().max() > 0
        assert rel_err(jvp, fd(F, (x, t, s), tangents)) < 1e-6


@torch.no_grad()
def test_student_from_teacher_is_exactly_the_teacher():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    teacher = randomize_gains(tiny(), gen)                                 # as if trained: gains != 0
    student = init_student_from_teacher(tiny(cond_s=True, cond_lam=True), teacher.state_dict())
    x, t, s, label, lam = inputs(gen)
    assert torch.equal(student(x, t, s, label, lam), teacher(x, t, t, label))
    assert torch.equal(student(x, t, s, None, None), teacher(x, t, t, None))
    student.emb_s_gain.fill_(1.0)                                          # the s branch is live
    assert not torch.allclose(student(x, t, s, label, lam), teacher(x, t, t, label))


@torch.no_grad()
def test_forced_weight_normalization():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    net = tiny()
    layers = [m for m in net.modules() if isinstance(m, MPConv)]
    for m in layers:                                                       # ||w_i|| = sqrt(fan_in)
        norms = m.weight.flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, m.weight[0].numel() ** 0.5), rtol=1e-3)
    x, t, s, label, _ = inputs(gen)
    before = [m.weight.clone() for m in layers]
    F_before = net(x, t, s, label)
    net.normalize_weights_()                                               # idempotent
    assert max((m.weight - w).abs().max().item() for m, w in zip(layers, before)) < 1e-6
    assert (net(x, t, s, label) - F_before).abs().max() < 1e-5             # float32 noise only
    for m in layers:                                                       # forward normalizes anyway
        m.weight.mul_(3.0)
    assert (net(x, t, s, label) - F_before).abs().max() < 1e-5
    net.normalize_weights_()                                               # and the step undoes it
    assert max((m.weight - w).abs().max().item() for m, w in zip(layers, before)) < 1e-6


@torch.no_grad()
def test_shapes_label_none_and_wrong_preset():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    net = randomize_gains(tiny(), gen)
    x, t, s, label, _ = inputs(gen)
    assert net(x, t, s, label).shape == x.shape
    assert torch.equal(net(x, t, s, None), net(x, t, s, torch.zeros_like(label)))
    assert net.features(x, t, label).shape == (N, 64, 16, 16)
    with pytest.raises(ValueError, match="cond_lam"):
        net(x, t, s, label, lam=torch.ones_like(t))
    other = UNet(num_classes=CLASSES, **{**PRESETS["tiny"], "model_channels": 8}, cond_s=True, cond_lam=True)
    with pytest.raises(ValueError, match="emb_t.weight: teacher"):
        init_student_from_teacher(other, net.state_dict())


@torch.no_grad()
def test_output_magnitude_at_init():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    net = tiny()
    x, _, _, label, _ = inputs(gen)
    for t in [0.0, 0.2, 0.5, 1.0]:                                         # c_skip = 0 at t = 0.2
        t = torch.full((N,), t)
        assert 0.2 < net(x, t, t, label).std() < 5
