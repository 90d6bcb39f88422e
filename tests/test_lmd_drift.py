"""LMD's teacher query at the predicted point, kept in the data range (losses.lmd_loss's data_range,
flowmap.velocity_in_range; docs/method.md §4, 'The teacher at the predicted point'), against
independent computations, and the drift it prevents (README, 'LMD divergence')."""
import math

import pytest
import torch

import flowmap
import losses
import toy2d
from gaussian_oracle import GaussianFlowMap, gaussian_velocity, mixture_velocity

f64 = dict(dtype=torch.float64)
LO, HI = torch.tensor([-1.0, -2.0], **f64), torch.tensor([1.0, 0.5], **f64)      # a per-coordinate box
POINTS = torch.tensor([[-0.9, -1.8], [0.8, 0.4], [0.1, -0.5], [-0.3, 0.2]], **f64)   # data inside it


def dirac_velocity(x, t):
    """Exact v of data uniform on POINTS (a mixture of zero-width Gaussians): its x0-prediction
    x - t v is a posterior average of the points, so it lies in [LO, HI]."""
    return mixture_velocity(x, t, torch.full((len(POINTS),), 1 / len(POINTS), **f64), POINTS,
                            torch.zeros(len(POINTS), **f64))


def test_velocity_in_range_against_a_per_sample_loop():
    """v_in = (x - clamp(x - s v)) / s for s > 0, and v + (x - clamp(x)) / s_min at s = 0."""
    g = torch.Generator().manual_seed(0)
    x, v = 3 * torch.randn(64, 2, generator=g, **f64), 5 * torch.randn(64, 2, generator=g, **f64)
    s = torch.rand(64, generator=g, **f64)
    s[:8] = 0.0                                                         # s = 0: the floor
    s[8:16] = 1e-4                                                     # small, but no floor
    out = flowmap.velocity_in_range(v, x, s, (LO, HI), s_min=1e-3)
    for i in range(64):
        D = [x[i, d].item() - s[i].item() * v[i, d].item() for d in range(2)]
        P = [min(max(D[d], LO[d].item()), HI[d].item()) for d in range(2)]
        for d in range(2):
            want = ((x[i, d].item() - P[d]) / s[i].item() if s[i] > 0
                    else v[i, d].item() + (x[i, d].item() - P[d]) / 1e-3)
            assert out[i, d].item() == pytest.approx(want, rel=1e-9, abs=1e-9), (i, d)


def test_velocity_in_range_keeps_an_exact_teacher_and_moves_a_wrong_one_toward_it():
    """For data inside the box the exact v passes unchanged, and a perturbed v is never moved farther
    from the exact one, per coordinate (clamping projects onto a box that holds the exact x0)."""
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(256, 2, generator=g, **f64)
    s = 0.02 + 0.98 * torch.rand(256, generator=g, **f64)
    exact = dirac_velocity(x, s)
    assert torch.equal(flowmap.velocity_in_range(exact, x, s, (LO, HI)), exact)
    wrong = exact + 3 * torch.randn(256, 2, generator=g, **f64)
    fixed = flowmap.velocity_in_range(wrong, x, s, (LO, HI))
    assert ((fixed - exact).abs() <= (wrong - exact).abs() + 1e-12).all()
    assert (fixed - exact).abs().sum() < 0.7 * (wrong - exact).abs().sum()   # and it does move many


def lmd_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.9 * torch.rand(n, generator=g, **f64)
    s = 0.05 + (t - 0.05) * torch.rand(n, generator=g, **f64)
    x_t = (1 - t[:, None]) * POINTS[torch.randint(len(POINTS), (n,), generator=g)] + t[:, None] * torch.randn(
        n, 2, generator=g, **f64)
    return x_t, t, s


def grads(loss, net):
    return torch.cat([p.flatten() for p in torch.autograd.grad(loss.sum(), list(net.parameters()))])


@pytest.mark.ex_lmd
def test_lmd_data_range_changes_nothing_while_the_teacher_is_in_range():
    """With the exact teacher of in-box data, data_range leaves LMD's loss and gradient exactly as
    they are (so every exact-flow-map check of lmd_loss still holds)."""
    net = GaussianFlowMap(torch.tensor([0.1, -0.4], **f64), torch.tensor(math.log(0.7), **f64))
    x_t, t, s = lmd_batch(128, seed=2)
    plain = losses.lmd_loss(net, dirac_velocity, x_t, t, s)
    ranged = losses.lmd_loss(net, dirac_velocity, x_t, t, s, data_range=(LO, HI))
    assert torch.equal(plain, ranged)
    assert torch.equal(grads(plain, net), grads(ranged, net))


@pytest.mark.ex_lmd
def test_lmd_data_range_is_the_loss_of_the_projected_teacher():
    """With a teacher whose x0-prediction overshoots, data_range gives the loss and gradient of LMD
    run on a teacher projected by hand: x0-prediction clamped, velocity (x - x0) / s."""
    def overshooting(x, t):
        return dirac_velocity(x, t) - 4 * x / t[:, None]                    # x0-prediction ~ 5 x: out of range

    def projected_by_hand(x, t):
        x0 = torch.maximum(torch.minimum(x - t[:, None] * overshooting(x, t), HI), LO)
        return (x - x0) / t[:, None]
    net = GaussianFlowMap(torch.tensor([0.1, -0.4], **f64), torch.tensor(math.log(0.7), **f64))
    x_t, t, s = lmd_batch(128, seed=3)
    ranged = losses.lmd_loss(net, overshooting, x_t, t, s, data_range=(LO, HI))
    by_hand = losses.lmd_loss(net, projected_by_hand, x_t, t, s)
    raw = losses.lmd_loss(net, overshooting, x_t, t, s)
    assert torch.allclose(ranged, by_hand, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grads(ranged, net), grads(by_hand, net), rtol=1e-8, atol=1e-12)
    assert not torch.allclose(ranged, raw)                              # the projection did act


# The drift (docs/method.md §4): a teacher that is exact for N(0, C^2 I) data where its x0-prediction
# stays in the box [-B, B]^2, and off it overshoots by K times the excursion, as a guided teacher's
# extrapolation can. Off the box it pulls toward the data at a rate K / s, faster than 1 / (t - s)
# for s < K t / (1 + K), so LMD's update grows F there. The student is the exact flow map plus a
# zero-initialized toy2d.MLP: at step 0 it is exact, and it drifts only through LMD's own updates.
C, B, K = 0.5, 1.5, 5.0


def overshooting_teacher(x, s):
    x0 = x - s[:, None] * gaussian_velocity(x, s, torch.zeros(2), C) + K * (x - x.clamp(-B, B))
    return (x - x0) / s[:, None]


def max_jump_F_after_lmd(data_range, steps=100, seed=1):
    torch.manual_seed(seed)
    exact = GaussianFlowMap(torch.zeros(2), torch.tensor(math.log(C))).requires_grad_(False)
    mlp = toy2d.MLP(hidden=32, depth=3, cond_s=True)
    torch.nn.init.zeros_(mlp.out[1].weight)
    torch.nn.init.zeros_(mlp.out[1].bias)
    net = lambda x, t, s: exact(x, t, s) + mlp(x, t, s)                 # noqa: E731
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(500, 2, generator=g)
    for _ in range(steps):
        t, s = losses.sample_t_s(128, generator=g)                      # s > 0: the teacher is defined
        x_t = (1 - t[:, None]) * C * torch.randn(128, 2, generator=g) + t[:, None] * torch.randn(128, 2, generator=g)
        loss = losses.lmd_loss(net, overshooting_teacher, x_t, t, s, data_range=data_range).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        F = net(z, torch.ones(500), torch.zeros(500))
    return F.norm(dim=1).max().item(), flowmap.jump_excursion(net, z, (-B, B))


@pytest.mark.ex_lmd
def test_lmd_does_not_drift_off_an_overshooting_teacher_with_the_data_range():
    """100 LMD steps: without data_range max |F(z, 1, 0)| runs away (2.2 -> 2.9e4, the reported
    symptom) and the training loops' divergence guard (flowmap.jump_excursion beyond the range's
    width) would stop it; with data_range it stays at the exact map's (|z| (1 - C) = 2.2 at most
    here; measured 2.1) and the guard stays quiet."""
    drifting, excursion = max_jump_F_after_lmd(None)
    assert drifting > 1e3, f"the construction did not drift without data_range (max |F(z, 1, 0)| {drifting:.3g})"
    assert excursion > 2 * B, f"the divergence guard misses the drift: excursion {excursion:.3g} <= {2 * B}"
    kept, excursion = max_jump_F_after_lmd((-B, B))
    assert kept < 10, f"LMD with data_range drifted: max |F(z, 1, 0)| {kept:.3g} after 100 steps (exact: ~2.2)"
    assert excursion < 2 * B, f"the divergence guard fires on a sane map: excursion {excursion:.3g}"


def test_a_teacher_in_range_flows_into_the_box():
    """docs/method.md §4: with x0-predictions in [lo, hi], the ODE from (x_t, t) ends in
    (s / t) x_t + (1 - s / t) [lo, hi]; RK4 on the projected overshooting teacher, from far outside too."""
    from gaussian_oracle import rk4_flow_map
    g = torch.Generator().manual_seed(5)
    x_t = 6 * torch.randn(64, 2, generator=g, **f64)

    def projected(x, t):
        return flowmap.velocity_in_range(dirac_velocity(x, t) - 4 * x / t[:, None], x, t, (LO, HI))
    for t, s in ((1.0, 0.5), (0.8, 0.1), (0.5, 0.02)):
        x_s = rk4_flow_map(projected, x_t, t, s, steps=400)
        lo, hi = s / t * x_t + (1 - s / t) * LO, s / t * x_t + (1 - s / t) * HI
        assert (x_s >= lo - 1e-6).all() and (x_s <= hi + 1e-6).all(), (t, s)
        raw = rk4_flow_map(lambda x, t_: dirac_velocity(x, t_) - 4 * x / t_[:, None], x_t, t, s, steps=400)
        assert ((raw < lo - 1) | (raw > hi + 1)).any(), (t, s)          # unprojected, it does leave
