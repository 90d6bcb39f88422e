"""losses.py against independent computations: its JVPs against finite differences, the EMD / LMD
surrogates against the exact Gaussian flow map and against their own discrete-time objectives,
and the schedule, weighting and GAN pieces against their closed forms."""
import math

import pytest
import torch

import flowmap
import losses
from jvp import value_and_jvp
from gaussian_oracle import GaussianFlowMap, gaussian_stats, gaussian_velocity

pytestmark = pytest.mark.filterwarnings("ignore:jvp.py has no tangent rule for 'tanh'")   # MLP below: exact anyway
f64 = dict(dtype=torch.float64)
MU, C = torch.tensor([0.7, -1.2, 0.3], **f64), 0.6                             # teacher data N(MU, C^2 I)
THETA_STAR = torch.cat([MU, torch.tensor([math.log(C)], **f64)])               # (mu, log c) of the exact map


def teacher(x, t):
    return gaussian_velocity(x, t, MU.to(x.dtype), C)


class MLP(torch.nn.Module):
    """A small smooth student net(x, t, s) -> F, x (N, D)."""

    def __init__(self, D=3, width=32, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(D + 2, width, dtype=dtype)
        self.l2 = torch.nn.Linear(width, width, dtype=dtype)
        self.l3 = torch.nn.Linear(width, D, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / p.shape[-1] ** 0.5)

    def forward(self, x, t, s):
        h = torch.cat([x, t[:, None], s[:, None]], dim=1)
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(h))))) * (1 + t - s)[:, None]


def batch(n, seed, dtype=torch.float64, s_zero=False):
    """x_t from the teacher's marginal at t, with 1 > t > s >= 0 (gaps not tiny)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.1
    s = torch.zeros_like(t) if s_zero else torch.rand(n, generator=g, dtype=dtype) * 0.8 * t
    m_t, sd_t = gaussian_stats(t, MU.to(dtype), C)
    x_t = m_t + sd_t * torch.randn(n, 3, generator=g, dtype=dtype)
    return x_t, t, s


def grad_of(loss, net):
    """Flattened gradient of a scalar loss w.r.t. all of net's parameters. A loss cut off from the
    network (a stub returning a constant, or a graph lost on the way) fails with a message about the
    objective rather than autograd's internal error."""
    names, params = zip(*net.named_parameters())
    if not loss.requires_grad:
        raise AssertionError("your loss has no gradient with respect to the network: it must contain "
                             "F_theta = net(x_t, t, s) with its graph (only the target is stop-gradient)")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise AssertionError(f"your loss has no gradient with respect to the network's {', '.join(unused)}: "
                             "it must contain F_theta = net(x_t, t, s) with its graph")
    return torch.cat([g.flatten() for g in grads])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# Each course exercise (README, `python -m exercises`) runs the tests marked with its marker.
KINDS = [pytest.param("emd", marks=pytest.mark.ex_emd), pytest.param("lmd", marks=pytest.mark.ex_lmd)]
FIXED_POINT = {"emd": "its end point does not move as x_t moves along the ODE",
               "lmd": "its end point moves with the ODE as s changes"}


# ----------------------------------------------------------------------------------------------
# Jacobian-vector products.

TANGENTS = {
    "d/dt along the ODE (v, 1, 0)": lambda x, t: (teacher(x, t), torch.ones_like(t), torch.zeros_like(t)),
    "d/ds (0, 0, 1)": lambda x, t: (torch.zeros_like(x), torch.zeros_like(t), torch.ones_like(t)),
}


@pytest.mark.parametrize("tangent", TANGENTS)
def test_exact_jvp_matches_central_differences(tangent):
    net = MLP()
    x, t, s = batch(16, seed=0)
    u = TANGENTS[tangent](x, t)
    out, jvp = value_and_jvp(net, (x, t, s), u, method="exact")
    h = 1e-6
    fd = (net(x + h * u[0], t + h * u[1], s + h * u[2]) - net(x - h * u[0], t - h * u[1], s - h * u[2])) / (2 * h)
    torch.testing.assert_close(out, net(x, t, s), rtol=0, atol=1e-14)
    torch.testing.assert_close(jvp, fd.detach(), rtol=0, atol=1e-8)
    assert out.requires_grad and not jvp.requires_grad                  # F_theta keeps its graph


@pytest.mark.parametrize("dtype, h, tol", [(torch.float32, 1e-3, 1e-2), (torch.float64, 1e-5, 1e-8)])
@pytest.mark.parametrize("tangent", TANGENTS)
def test_fd_jvp_matches_exact(tangent, dtype, h, tol):
    net = MLP(dtype=dtype)
    x, t, s = batch(16, seed=1, dtype=dtype)
    u = TANGENTS[tangent](x, t)
    out_fd, jvp_fd = value_and_jvp(net, (x, t, s), u, method="fd", h=h)
    out_ex, jvp_ex = value_and_jvp(net, (x, t, s), u, method="exact")
    torch.testing.assert_close(out_fd, out_ex)
    torch.testing.assert_close(jvp_fd, jvp_ex, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# The exact Gaussian flow map as the student, the exact Gaussian velocity as the teacher.

def gaussian_student(theta):
    return GaussianFlowMap(theta[:3], theta[3])


def surrogate(kind, net, x_t, t, s, c):
    if kind == "emd":
        return losses.emd_loss(net, teacher, x_t, t, s, r=1.0, c=c)
    return losses.lmd_loss(net, teacher, x_t, t, s, c=c)


@pytest.mark.parametrize("c", [0.1, None])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_vanishes_at_the_exact_flow_map(kind, c):
    net = gaussian_student(THETA_STAR)
    x_t, t, s = batch(128, seed=2)
    largest = grad_of(surrogate(kind, net, x_t, t, s, c).sum(), net).abs().max().item()
    assert largest < 1e-10, (
        f"{kind.upper()} gradient at the exact flow map is {largest:.2e}, not 0: the exact map is a fixed "
        f"point ({FIXED_POINT[kind]}), so the target must equal F^- there; check for a term that does not vanish")


@pytest.mark.parametrize("c", [0.1, None])
@pytest.mark.parametrize("kind", KINDS)
def test_descent_moves_a_perturbed_student_toward_the_truth(kind, c):
    """At theta = theta* + delta, the summed gradient has positive cosine with delta (so -grad has a
    component toward theta*), for random and coordinate-aligned perturbations of either sign."""
    x_t, t, s = batch(128, seed=3)
    g = torch.Generator().manual_seed(4)
    deltas = [0.05 * torch.randn(4, generator=g, **f64) for _ in range(6)]
    deltas += [sign * 0.05 * e for e in torch.eye(4, **f64) for sign in (1, -1)]
    for delta in deltas:
        net = gaussian_student(THETA_STAR + delta)
        grad = grad_of(surrogate(kind, net, x_t, t, s, c).sum(), net)
        cosine = torch.nn.functional.cosine_similarity(grad, delta, dim=0).item()
        assert cosine > 0.1, (
            f"{kind.upper()} on a student perturbed from the exact map by {[round(d, 3) for d in delta.tolist()]}: "
            f"gradient descent does not lead back (cosine of the gradient with the perturbation {cosine:.2f}, "
            "should be > 0.1). Check the sign of the target")


class GaussianCM(torch.nn.Module):
    """The exact consistency model of N(mu, c^2 I) data written on its own, valid for s = 0:
    f(x_t, t, 0) = mu + (c / sd_t)(x_t - m_t), served as F = (x_t - f) / t so that
    flow_map(net, x_t, t, 0) = f."""

    def __init__(self, mu, log_c):
        super().__init__()
        self.mu = torch.nn.Parameter(mu.clone())
        self.log_c = torch.nn.Parameter(log_c.clone())

    def forward(self, x, t, s):
        assert bool((s == 0).all())
        c, t = self.log_c.exp(), t[:, None]
        sd_t = ((1 - t) ** 2 * c ** 2 + t ** 2).sqrt()
        f = self.mu + c / sd_t * (x - (1 - t) * self.mu)
        return (x - f) / t


@pytest.mark.ex_emd
@pytest.mark.parametrize("c", [0.1, None])
def test_emd_at_s_zero_is_the_consistency_objective(c):
    """emd_loss with s = 0 has zero gradient at the exact CM, and a perturbed CM is pulled back."""
    x_t, t, s = batch(128, seed=5, s_zero=True)
    net = GaussianCM(MU, THETA_STAR[3])
    largest = grad_of(losses.emd_loss(net, teacher, x_t, t, s, r=1.0, c=c).sum(), net).abs().max().item()
    assert largest < 1e-10, (f"EMD with s = 0 has gradient {largest:.2e} at the exact consistency model, not 0: "
                             "with s = 0 the (s - t) factors become -t; check the terms of df/dt")
    delta = torch.tensor([0.03, -0.02, 0.04, -0.05], **f64)
    net = GaussianCM(MU + delta[:3], THETA_STAR[3] + delta[3])
    grad = grad_of(losses.emd_loss(net, teacher, x_t, t, s, r=1.0, c=c).sum(), net)
    cosine = torch.nn.functional.cosine_similarity(grad, delta, dim=0).item()
    assert cosine > 0.1, (f"EMD with s = 0 does not pull a perturbed consistency model back (cosine {cosine:.2f}): "
                          "check the sign of the target")


# ----------------------------------------------------------------------------------------------
# s = t: both objectives reduce to flow-matching distillation.

@pytest.mark.parametrize("kind", KINDS)
def test_objectives_at_s_equal_t_are_flow_matching(kind):
    net = MLP(seed=6)
    x_t, t, _ = batch(32, seed=6)
    if kind == "emd":
        loss = losses.emd_loss(net, teacher, x_t, t, t, r=0.99, c=None)     # r multiplies (s - t) = 0
    else:
        loss = losses.lmd_loss(net, teacher, x_t, t, t, c=None)
    fm = (net(x_t, t, t) - teacher(x_t, t)).square().mean(dim=1)
    torch.testing.assert_close(
        grad_of(loss.sum(), net), grad_of(fm.sum(), net), rtol=1e-12, atol=1e-14,
        msg=lambda m: f"{kind.upper()} at s = t (c = None) must give exactly the flow-matching gradient of "
                      "||F - v||^2: check what is left of your target when s = t, and its sign.\n" + m)


# ----------------------------------------------------------------------------------------------
# The limit derivations: grad L_eps / eps of the discrete objectives -> the surrogate gradient,
# weighted by (t - s)^2 and D (the surrogates are means over the D dims, the discrete losses sums).

def emd_discrete(net, x_t, t, s, eps):
    """|| f(x_t, t, s) - f^-(x_t', t', s) ||^2 with t' = t + eps (s - t) and x_t' one teacher Euler step."""
    t_ = t + eps * (s - t)
    with torch.no_grad():
        x_ = x_t + flowmap.bcast(t_ - t, x_t) * teacher(x_t, t)
        target = flowmap.flow_map(net, x_, t_, s)
    return (flowmap.flow_map(net, x_t, t, s) - target).square().sum()


def lmd_discrete(net, x_t, t, s, eps):
    """|| f(x_t, t, s) - [y + (s - s') v(y, s')] ||^2 with s' = s + eps (t - s) and y = f^-(x_t, t, s')."""
    s_ = s + eps * (t - s)
    with torch.no_grad():
        y = flowmap.flow_map(net, x_t, t, s_)
        target = y + flowmap.bcast(s - s_, y) * teacher(y, s_)
    return (flowmap.flow_map(net, x_t, t, s) - target).square().sum()


@pytest.mark.parametrize("kind", KINDS)
def test_surrogate_gradient_is_the_limit_of_the_discrete_objective(kind):
    net = MLP(seed=7)
    x_t, t, s = batch(16, seed=7)
    D = x_t[0].numel()
    limit = grad_of(((t - s) ** 2 * D * surrogate(kind, net, x_t, t, s, c=None)).sum(), net)
    discrete = emd_discrete if kind == "emd" else lmd_discrete
    errors = []
    for eps in (1e-3, 1e-4, 1e-5):
        g = grad_of(discrete(net, x_t, t, s, eps), net) / eps
        errors.append(rel(g, limit))
    hint = ("check the JVP's tangent, the (s - t) factors, and which terms are stop-gradient" if kind == "emd" else
            "check the derivative in s (the JVP's tangent and its factor), where the teacher is evaluated, "
            "and the sign")
    assert errors[-1] < 1e-4, (
        f"{kind.upper()} gradient (times (t - s)^2 D) differs from the eps -> 0 limit of the discrete objective "
        f"by {errors[-1]:.3g} (relative; eps = 1e-3, 1e-4, 1e-5 give {', '.join(f'{e:.2g}' for e in errors)}): {hint}")
    for coarse, fine in zip(errors, errors[1:]):                              # O(eps): same sign and factor
        assert 5 < coarse / fine < 20, (f"{kind.upper()}: the distance to the discrete gradient should shrink like "
                                        f"eps, got {', '.join(f'{e:.2g}' for e in errors)} for eps = 1e-3, 1e-4, 1e-5")


@pytest.mark.ex_emd
@pytest.mark.ex_lmd
def test_fd_jvp_inside_the_losses():
    """The finite-difference JVP gives the same loss gradients as forward-mode AD."""
    net = MLP(seed=8)
    x_t, t, s = batch(16, seed=8)
    for loss in (losses.emd_loss, losses.lmd_loss):
        exact = grad_of(loss(net, teacher, x_t, t, s, jvp_method="exact").sum(), net)
        fd = grad_of(loss(net, teacher, x_t, t, s, jvp_method="fd").sum(), net)
        assert rel(fd, exact) < 1e-5, (                                         # O(h^2), h = 1e-3
            f"{loss.__name__} with jvp_method='fd' differs from 'exact' by {rel(fd, exact):.2g}: compute the "
            "JVP with jvp.value_and_jvp(..., method=jvp_method), the same pass as F_theta")


# ----------------------------------------------------------------------------------------------
# Training schedule pieces.

def test_tangent_warmup():
    assert losses.tangent_warmup(0, 100, 0.99) == 0.0
    assert losses.tangent_warmup(25, 100, 0.99) == pytest.approx(0.2475)
    assert losses.tangent_warmup(100, 100, 0.99) == pytest.approx(0.99)
    assert losses.tangent_warmup(10_000, 100, 0.99) == pytest.approx(0.99)
    assert losses.tangent_warmup(0, 0, 0.99) == pytest.approx(0.99)
    r = [losses.tangent_warmup(k, 100, 0.5) for k in range(0, 101, 10)]
    assert all(b - a == pytest.approx(0.05) for a, b in zip(r, r[1:]))


@pytest.mark.parametrize("dist", ["uniform", "logitnormal"])
def test_sample_t_s_fractions_and_order(dist):
    n = 200_000
    g = torch.Generator().manual_seed(9)
    t, s = losses.sample_t_s(n, dist, p_diag=0.2, p_zero=0.1, generator=g)
    assert t.shape == s.shape == (n,)
    assert bool((t <= 1).all() and (s >= 0).all() and (t >= s).all())
    assert abs((s == t).double().mean().item() - 0.2) < 0.005
    assert abs((s == 0).double().mean().item() - 0.1) < 0.005


def test_sample_t_s_marginals():
    """Without the diagonal / zero fractions: uniform pairs have E[t] = 2/3, E[s] = 1/3 (max and min
    of two uniforms); logit-normal draws, unsorted, have logit mean P_mean and std P_std."""
    n = 200_000
    t, s = losses.sample_t_s(n, "uniform", generator=torch.Generator().manual_seed(10))
    assert abs(t.mean().item() - 2 / 3) < 0.005 and abs(s.mean().item() - 1 / 3) < 0.005
    t, s = losses.sample_t_s(n, "logitnormal", P_mean=-0.8, P_std=1.3,
                             generator=torch.Generator().manual_seed(11))
    logit = torch.logit(torch.cat([t, s]).double())
    assert abs(logit.mean().item() + 0.8) < 0.01 and abs(logit.std().item() - 1.3) < 0.01


@pytest.mark.parametrize("power", [1.5, 2.0])
def test_sample_t_s_power(power):
    """u -> u^power on uniform pairs: t = max(u1, u2)^power has P(t <= x) = x^(2 / power), and
    s = min(u1, u2)^power has P(s <= x) = 1 - (1 - x^(1 / power))^2."""
    n = 200_000
    t, s = losses.sample_t_s(n, "uniform", power=power, generator=torch.Generator().manual_seed(12))
    for x in (0.1, 0.3, 0.6):
        assert abs((t <= x).double().mean().item() - x ** (2 / power)) < 0.005
        assert abs((s <= x).double().mean().item() - (1 - (1 - x ** (1 / power)) ** 2)) < 0.005


def test_adaptive_weight():
    torch.manual_seed(12)
    weight = losses.AdaptiveWeight()
    g = torch.Generator().manual_seed(12)
    t, s = losses.sample_t_s(64, generator=g)
    loss = torch.rand(64, generator=g)
    assert torch.equal(weight(loss, t, s), loss)                              # u = 0 at init
    # exp(-u) L + u has its minimum 1 + log L at exp(u) = L.
    L = 3.0
    opt = torch.optim.Adam(weight.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / 400)
    for _ in range(400):
        t, s = losses.sample_t_s(64, generator=g)
        opt.zero_grad()
        weight(torch.full((64,), L), t, s).mean().backward()
        opt.step()
        sched.step()
    t, s = losses.sample_t_s(4096, generator=g)
    with torch.no_grad():
        u = weight(torch.zeros(4096), t, s)                                   # with loss 0 the output is u
        objective = weight(torch.full((4096,), L), t, s)
    assert abs(u.exp().mean().item() / L - 1) < 0.01
    assert abs(u.exp().median().item() / L - 1) < 0.01
    assert objective.mean().item() - (1 + math.log(L)) < 2e-3


# ----------------------------------------------------------------------------------------------
# RpGAN with R1 / R2.

@pytest.mark.ex_adversarial
def test_rpgan_signs_and_form():
    """The pairing loss is the logistic loss of the score difference u = D(fake) - D(real): it depends
    on u only, equals log 2 at u = 0, and solves dL/du = 1 - exp(-L) (which pins it down)."""
    d_real = torch.linspace(-2, 2, 9, dtype=torch.float64, requires_grad=True)
    d_fake = torch.linspace(1, -1, 9, dtype=torch.float64, requires_grad=True)
    d_loss, g_loss = losses.rpgan_d_loss(d_real, d_fake), losses.rpgan_g_loss(d_real, d_fake)
    torch.testing.assert_close(losses.rpgan_d_loss(d_real + 3, d_fake + 3), d_loss, msg=lambda m: (
        "the RpGAN loss must depend on the paired scores only through D(fake) - D(real) (relativistic)\n" + m))
    zero = losses.rpgan_d_loss(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert abs(zero.item() - math.log(2)) < 1e-12, (
        f"the RpGAN loss of a tie D(real) = D(fake) is {zero.item():.4f}, not log 2: it is a logistic loss "
        "(a negative log-likelihood) of the event 'real outscores fake'")
    gr, gf = torch.autograd.grad(d_loss.sum(), (d_real, d_fake))
    torch.testing.assert_close(gf, 1 - torch.exp(-d_loss.detach()), msg=lambda m: (
        "the RpGAN loss L(u), u = D(fake) - D(real), must satisfy dL/du = 1 - exp(-L) (the logistic loss): "
        "check its form\n" + m))
    assert bool((gr < 0).all() and (gf > 0).all()), "the D loss must fall as D(real) rises and D(fake) falls"
    torch.testing.assert_close(g_loss, losses.rpgan_d_loss(d_fake, d_real), msg=lambda m: (
        "the generator's loss is the discriminator's with the roles of real and fake swapped\n" + m))
    gr, gf = torch.autograd.grad(g_loss.sum(), (d_real, d_fake))
    assert bool((gr > 0).all() and (gf < 0).all()), "the G loss must fall as D(fake) rises above D(real)"


@pytest.mark.ex_adversarial
def test_grad_penalty_linear_and_quadratic():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(8, 2, 3, generator=g)
    w = torch.randn(6, generator=g, requires_grad=True)
    linear = lambda x: x.flatten(1) @ w                                        # grad_x D = w
    penalty = losses.grad_penalty(linear, x)
    torch.testing.assert_close(penalty, w.square().sum().expand(8), msg=lambda m: (
        "R1/R2 of a linear D(x) = w.x must be ||grad_x D||^2 = ||w||^2 for every sample (per-sample squared "
        "norm of the gradient with respect to the input, summed over its dimensions)\n" + m))
    # The penalty is differentiable in D's weights (R1 trains D): d ||w||^2 / dw = 2 w.
    assert penalty.requires_grad, ("the penalty has no gradient with respect to D's weights: take grad_x D "
                                   "with create_graph=True so that R1/R2 can train D")
    (dw,) = torch.autograd.grad(penalty.mean(), w)
    torch.testing.assert_close(dw, 2 * w.detach(), msg=lambda m: "d ||w||^2 / dw must be 2 w\n" + m)
    A = torch.randn(6, 6, generator=g)
    quadratic = lambda x: torch.einsum("ni,ij,nj->n", x.flatten(1), A, x.flatten(1))
    expect = (x.flatten(1) @ (A + A.T)).square().sum(dim=1)                  # grad_x D = (A + A^T) x
    torch.testing.assert_close(losses.grad_penalty(quadratic, x), expect, msg=lambda m: (
        "R1/R2 of a quadratic D(x) = x^T A x must be ||(A + A^T) x||^2 per sample\n" + m))
