"""flowmap.py against exact answers: the Gaussian flow map, a Gaussian-mixture teacher solved by
RK4 and by quadrature, and the consistency-vs-flow-map compounding of AYF Theorem 3.1."""
import math

import pytest
import torch

import flowmap
from gaussian_oracle import (GaussianFlowMap, gaussian_phi, gaussian_velocity, mixture_velocity,
                             rk4_flow_map)

f64 = dict(dtype=torch.float64)
MU, C = torch.tensor([0.7, -1.2, 0.3], **f64), 0.6                             # x0 ~ N(MU, C^2 I)
MIX_W = torch.tensor([0.5, 0.3, 0.2], **f64)                                   # a 2D mixture teacher
MIX_MU = torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], **f64)
MIX_SD = torch.tensor([0.3, 0.5, 0.4], **f64)


@pytest.fixture(autouse=True)
def float64():
    """Every test here is exact up to rounding, so it runs in float64."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def exact_net():
    return GaussianFlowMap(MU, torch.tensor(math.log(C)))


def random_times(n, generator):
    t = torch.rand(n, generator=generator) * 0.9 + 0.05
    s = torch.rand(n, generator=generator) * t
    return t, s


def seeded_noise(seed):
    """A noise function whose draws depend only on the seed and the call order."""
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------
# The parameterization and the Gaussian oracle.

def test_flow_map_is_identity_at_s_equal_t():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 3, generator=g), torch.rand(16, generator=g)
    wild = lambda x, t, s: 1e3 * torch.sin(7 * x) * (1 + t + s)[:, None]        # any finite F
    assert torch.equal(flowmap.flow_map(wild, x, t, t), x)
    assert torch.equal(flowmap.flow_map(exact_net(), x, t, t), x)


def test_gaussian_flow_map_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g) * 1.5
    t, s = random_times(64, g)
    net = exact_net()
    with torch.no_grad():
        # f = x + (s - t) F reproduces Phi.
        torch.testing.assert_close(flowmap.flow_map(net, x, t, s), gaussian_phi(x, t, s, MU, C),
                                   rtol=0, atol=1e-12)
        # F is the naive difference quotient where s != t ...
        naive = (gaussian_phi(x, t, s, MU, C) - x) / (s - t)[:, None]
        torch.testing.assert_close(net(x, t, s), naive, rtol=0, atol=1e-10)
        # ... and the velocity at s = t, where the quotient is 0/0.
        torch.testing.assert_close(net(x, t, t), gaussian_velocity(x, t, MU, C), rtol=0, atol=1e-12)


def test_gaussian_velocity_is_time_derivative_of_phi():
    """v(x, t) = d/ds Phi(x, t, s) at s = t, by float64 central differences."""
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(32, 3, generator=g), torch.rand(32, generator=g) * 0.9 + 0.05
    h = 1e-6
    fd = (gaussian_phi(x, t, t + h, MU, C) - gaussian_phi(x, t, t - h, MU, C)) / (2 * h)
    torch.testing.assert_close(gaussian_velocity(x, t, MU, C), fd, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Samplers with the exact map.

@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_flow_map_sampler_is_exact_at_every_step_count(steps):
    z = torch.randn(128, 3, generator=torch.Generator().manual_seed(3))
    ones = torch.ones(128)
    x = flowmap.sample_flow_map(exact_net(), z, steps)
    torch.testing.assert_close(x, gaussian_phi(z, ones, 0 * ones, MU, C), rtol=0, atol=1e-10)


@pytest.mark.ex_gamma
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_gamma_sampler_endpoints(steps):
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(4))
    net = exact_net()
    torch.testing.assert_close(flowmap.sample_gamma(net, z, steps, 0.0, noise=seeded_noise(5)),
                               flowmap.sample_flow_map(net, z, steps), rtol=0, atol=1e-12, msg=lambda m: (
        "gamma = 0 must be the deterministic flow-map sampler: s' = s and no noise added\n" + m))
    torch.testing.assert_close(flowmap.sample_gamma(net, z, steps, 1.0, noise=seeded_noise(5)),
                               flowmap.sample_consistency(net, z, steps, noise=seeded_noise(5)),
                               rtol=0, atol=1e-12, msg=lambda m: (
        "gamma = 1 must be consistency sampling: jump to s' = 0, then re-noise to s with all-fresh noise, "
        "one noise draw per step except the last\n" + m))


@pytest.mark.ex_gamma
@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_gamma_sampler_preserves_marginals(gamma):
    """With the exact map every gamma lands on N(mu, c^2): the jump to s' and the re-noising keep
    the mean (1 - s) mu and the variance (1 - s)^2 c^2 + s^2 of x_s (Monte Carlo, 1D)."""
    mu, c, n = torch.tensor([0.4]), 0.5, 200_000
    net = GaussianFlowMap(mu, torch.tensor(math.log(c)))
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(6))
    x = flowmap.sample_gamma(net, z, 4, gamma, noise=seeded_noise(7))
    assert abs(x.mean().item() - 0.4) < 5 * c / n ** 0.5, (
        f"gamma = {gamma}: samples of N(0.4, 0.5^2) data have mean {x.mean().item():.4f}: the rescaling after "
        "the jump must turn the data coefficient (1 - s') of time s' into the (1 - s) of time s")
    assert abs(x.std().item() / c - 1) < 0.01, (
        f"gamma = {gamma}: samples have std {x.std().item():.4f}, the data {c}: the marginal of each x_s must "
        "be kept, so the noise left after the jump to s' (rescaled) plus the added gamma s z must total "
        "variance s^2; check s'")


# ----------------------------------------------------------------------------------------------
# ODE solvers and the Gaussian-mixture teacher.

def mixture(x, t):
    return mixture_velocity(x, t, MIX_W, MIX_MU, MIX_SD)


def test_mixture_velocity_with_one_component_is_gaussian():
    g = torch.Generator().manual_seed(8)
    x, t = torch.randn(32, 3, generator=g), torch.rand(32, generator=g)
    v = mixture_velocity(x, t, torch.ones(1), MU[None], torch.tensor([C]))
    torch.testing.assert_close(v, gaussian_velocity(x, t, MU, C), rtol=0, atol=1e-12)


def posterior_mean_velocity_by_quadrature(x, t, weights, means, stds, lim=5.0, n=401):
    """v(x, t) = E[eps - x0 | x_t = x] by direct numerical integration over a grid of x0 (D <= 2):
    p(x0 | x_t) is proportional to p_data(x0) N(x_t; (1 - t) x0, t^2 I), and eps = (x_t - (1 - t) x0) / t.
    Shares nothing with mixture_velocity (no responsibilities, no per-component velocity)."""
    D = means.shape[1]
    axis = torch.linspace(-lim, lim, n)
    grid = torch.cartesian_prod(*[axis] * D).reshape(-1, D)                      # (G, D)
    dens = sum(w * torch.exp(-((grid - m) ** 2).sum(1) / (2 * sd ** 2)) / (2 * math.pi * sd ** 2) ** (D / 2)
               for w, m, sd in zip(weights, means, stds))                        # p_data on the grid
    out = []
    for xi, ti in zip(x, t):
        lik = torch.exp(-((xi - (1 - ti) * grid) ** 2).sum(1) / (2 * ti ** 2))
        post = dens * lik / (dens * lik).sum()
        eps = (xi - (1 - ti) * grid) / ti
        out.append((post[:, None] * (eps - grid)).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("D", [1, 2])
def test_mixture_velocity_equals_posterior_mean_by_quadrature(D):
    g = torch.Generator().manual_seed(9)
    means = MIX_MU[:, :D]
    x = torch.randn(12, D, generator=g) * 1.2
    t = torch.linspace(0.2, 0.95, 12)
    v = mixture_velocity(x, t, MIX_W, means, MIX_SD)
    torch.testing.assert_close(v, posterior_mean_velocity_by_quadrature(x, t, MIX_W, means, MIX_SD),
                               rtol=0, atol=1e-8)


def test_rk4_on_gaussian_matches_closed_form():
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(10))
    ones = torch.ones(64)
    x = rk4_flow_map(lambda x, t: gaussian_velocity(x, t, MU, C), z, 1.0, 0.0, steps=200)
    torch.testing.assert_close(x, gaussian_phi(z, ones, 0 * ones, MU, C), rtol=0, atol=1e-9)


def test_ode_samplers_converge_to_rk4_on_mixture():
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(11))
    ref = rk4_flow_map(mixture, z, 1.0, 0.0, steps=400)
    # RK4 itself is converged: with half its steps (16x its error) it moves by < 1e-7.
    assert (rk4_flow_map(mixture, z, 1.0, 0.0, steps=200) - ref).abs().max() < 1e-7
    err = lambda method, n: (flowmap.sample_ode(mixture, z, n, method) - ref).abs().max().item()
    heun = [err("heun", n) for n in (100, 200)]
    assert heun[1] < 1e-3
    assert 3.0 < heun[0] / heun[1] < 5.0                                        # second order
    euler = [err("euler", n) for n in (100, 200, 400)]
    for coarse, fine in zip(euler, euler[1:]):
        assert 1.7 < coarse / fine < 2.3                                        # first order


# ----------------------------------------------------------------------------------------------
# Guided velocity (Autoguidance).

@pytest.mark.ex_guidance
def test_guided_velocity():
    g = torch.Generator().manual_seed(12)
    x, t = torch.randn(8, 3, generator=g), torch.rand(8, generator=g)
    main = lambda x, t: gaussian_velocity(x, t, MU, C)
    weak = lambda x, t: gaussian_velocity(x, t, 0 * MU, 1.5 * C)

    def never(x, t):
        raise AssertionError("the weak model must not be called when lam = 1")

    v = main(x, t)
    for lam in (None, 1.0, 1, torch.ones(8), torch.tensor(1.0)):
        assert torch.equal(flowmap.guided_velocity(main, never, x, t, lam=lam), v), (
            f"lam = {lam!r} must return the teacher's velocity itself")
    with pytest.raises(ValueError):                                             # lam != 1 without a weak model
        flowmap.guided_velocity(main, None, x, t, lam=2.0)
    lam = torch.linspace(1.0, 3.0, 8)
    expect = torch.stack([l * v[i] + (1 - l) * weak(x, t)[i] for i, l in enumerate(lam)])
    torch.testing.assert_close(flowmap.guided_velocity(main, weak, x, t, lam=lam), expect, msg=lambda m: (
        "per-sample lam: sample i extrapolates from the weak model towards the teacher with its own lam[i]\n" + m))
    torch.testing.assert_close(flowmap.guided_velocity(main, weak, x, t, lam=1.7),
                               1.7 * v - 0.7 * weak(x, t), msg=lambda m: (
        "lam = 1.7: guidance extrapolates from the weak model through the teacher (Autoguidance Eq. 1)\n" + m))


# ----------------------------------------------------------------------------------------------
# AYF Theorem 3.1: multistep consistency sampling compounds errors, flow maps do not.
#
# Data N(0, c^2), c = 0.5, 1D, and consistency models that are linear, f(x, t) = k(t) x. An N-step
# sample is then Gaussian, N(0, sigma_N^2), and its W2 to the data is |sigma_N - c|; cm_sample_std
# computes sigma_N (course exercise 5). The optimal CM is k*(t) = c / sd_t. Perturbing it by delta x_t
# (f = f* + delta x_t, as close as we like for small delta) gives a 1-step error that a second step
# partly repairs, after which re-noising compounds it.

THM_C = 0.5


def sd(t):
    return ((1 - t) ** 2 * THM_C ** 2 + t ** 2) ** 0.5


CMS = {
    "optimal": lambda t, delta: THM_C / sd(t),
    "additive": lambda t, delta: THM_C / sd(t) + delta,                       # f* + delta x_t
    "scaled": lambda t, delta: (1 + delta) * THM_C / sd(t),                   # (1 + delta) f*
}


def cm_sample_std(k, steps):
    """sigma_N of consistency multistep sampling (uniform grid 1 -> 0) with f(x, t) = k(t) x.

    x0_hat = k x maps N(0, var) to N(0, k^2 var); re-noising to t' gives var' = (1 - t')^2 k^2 var + t'^2.
    """
    grid = [1 - i / steps for i in range(steps + 1)]
    var = 1.0
    for t, t_next in zip(grid[:-1], grid[1:]):
        var = k(t) ** 2 * var                                                   # x0_hat
        var = (1 - t_next) ** 2 * var + t_next ** 2                             # re-noise
    return var ** 0.5


class LinearCM(torch.nn.Module):
    """f(x, t, 0) = k(t) x as a net for the samplers: F = (x - f) / t, valid for s = 0 only."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, t, s):
        assert bool((s == 0).all())
        return (x - self.k(t)[:, None] * x) / t[:, None]


STEPS = [1, 2, 4, 8, 16]


@pytest.mark.ex_theorem
def test_optimal_cm_and_optimal_flow_map_are_exact_at_every_step_count():
    net = GaussianFlowMap(torch.zeros(1), torch.tensor(math.log(THM_C)))
    for steps in STEPS:
        sigma = cm_sample_std(lambda t: CMS["optimal"](t, 0.0), steps)
        assert abs(sigma - THM_C) < 1e-12, (
            f"the optimal CM sampled in {steps} steps should give the data's std {THM_C}, the recursion gives "
            f"{sigma}: each step maps x_t to x0_hat exactly, and re-noising gives x_t' the marginal of t'")
        # The flow-map sampler is linear in z here: its output for z = 1 is sigma_N.
        sigma = flowmap.sample_flow_map(net, torch.ones(1, 1), steps).item()
        assert abs(sigma - THM_C) < 1e-12


@pytest.mark.ex_theorem
@pytest.mark.parametrize("delta", [0.05, 0.01, 0.001])
@pytest.mark.parametrize("name", ["additive", "scaled"])
def test_perturbed_cm_gets_worse_with_more_steps(name, delta):
    w2 = [abs(cm_sample_std(lambda t: CMS[name](t, delta), n) - THM_C) for n in STEPS]
    table = ", ".join(f"{n} steps {w:.2e}" for n, w in zip(STEPS, w2))
    assert w2[-1] > 2 * min(w2), f"{name} perturbation {delta}: 16 steps should be far from the best ({table})"
    assert all(a < b for a, b in zip(w2[1:], w2[2:])), (
        f"{name} perturbation {delta}: W2 should grow with every doubling from 2 steps on ({table})")
    if name == "additive":                                                      # the paper's toy: 2 steps is best
        assert min(w2) == w2[1], f"additive perturbation {delta}: 2 steps should be best ({table})"


@pytest.mark.ex_theorem
@pytest.mark.parametrize("steps", [1, 2, 16])
def test_cm_recursion_matches_sampler(steps):
    """The closed-form recursion against flowmap.sample_consistency on 200k samples."""
    delta = 0.05
    k = lambda t: CMS["additive"](t, delta)
    z = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(13))
    x = flowmap.sample_consistency(LinearCM(k), z, steps, noise=seeded_noise(14))
    sigma = cm_sample_std(k, steps)
    assert abs(x.std().item() / sigma - 1) < 0.01, (
        f"{steps} steps: the consistency sampler's samples have std {x.std().item():.4f}, the recursion says "
        f"{sigma:.4f}: check what x0_hat = k x does to the variance and what re-noising adds")


def test_jump_excursion_measures_how_far_the_one_step_jump_leaves_the_data_range():
    """Against a per-sample loop: distance of z - F(z, 1, 0) outside the box, RMS over coordinates."""
    class Const(torch.nn.Module):                                       # F(z, 1, 0) = z - target
        def __init__(self, target):
            super().__init__()
            self.target = target

        def forward(self, x, t, s):
            return x - self.target
    lo, hi = torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0])
    z = torch.randn(3, 2)
    inside = torch.tensor([[0.5, -1.5], [-1.0, 2.0], [0.0, 0.0]])
    assert flowmap.jump_excursion(Const(inside), z, (lo, hi)) == 0.0
    outside = torch.tensor([[1.5, 0.0], [0.0, -5.0], [-4.0, 6.0]])     # out by (0.5, 0), (0, 3), (3, 4)
    expected = max(math.sqrt((0.5 ** 2 + 0) / 2), math.sqrt((0 + 3 ** 2) / 2), math.sqrt((3 ** 2 + 4 ** 2) / 2))
    assert flowmap.jump_excursion(Const(outside), z, (lo, hi)) == pytest.approx(expected, rel=1e-6)

