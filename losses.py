"""Every training objective of AYF, each returning per-sample losses; the training loop reduces them.

    fm_loss        flow matching, for the teacher and the weak guide
    emd_loss       AYF-EMD, the Eulerian map distillation objective (AYF Sec. 3.1, its Eulerian theorem)
    lmd_loss       AYF-LMD, the Lagrangian map distillation objective (AYF Sec. 3.1, its Lagrangian theorem)
    the consistency-model baseline is emd_loss with s = 0 (continuous-time CM, sCM)
    rpgan_*        relativistic pairing GAN with R1 / R2 penalties, for adversarial finetuning (AYF Sec. 3.3)

plus the pieces the objectives need: the tangent warmup schedule, the (t, s) pair sampler, and the
learned adaptive weighting. The Jacobian-vector products come from jvp.py, in the same forward pass
as the trainable F_theta. Sign conventions: docs/method.md §1-4.
"""
import math

import torch
import torch.nn.functional as nnf

from flowmap import bcast, velocity_in_range
from jvp import value_and_jvp


def _normalize(T, c):
    """Tangent normalization (sCM Sec. 4.2; AYF Sec. 3.2): g = T / (||T|| + c), norm per sample."""
    if c is None:
        return T
    return T / (bcast(T.flatten(1).norm(dim=1), T) + c)


def _per_sample_mse(a, b):
    return (a - b).square().flatten(1).mean(dim=1)                      # (N,)


# ----------------------------------------------------------------------------------------------
# Objectives.

def fm_loss(net, x0, eps, t, **cond):
    """Flow matching (Lipman et al. 2023; Liu et al. 2023): ||F(x_t, t, t) - (eps - x0)||^2.

    x_t = (1 - t) x0 + t eps, and the regression target eps - x0 has conditional mean v(x_t, t).
    """
    x_t = (1 - bcast(t, x0)) * x0 + bcast(t, x0) * eps
    return _per_sample_mse(net(x_t, t, t, **cond), eps - x0)


def emd_loss(net, velocity, x_t, t, s, r=0.99, c=0.1, jvp_method="exact", **cond):
    """AYF-EMD, Eulerian map distillation (AYF Sec. 3.1, Eulerian theorem). Per-sample surrogate.

    Derivation: docs/method.md §3.

    Discrete form. Match the map at (x_t, t) to the stop-gradient map one teacher Euler step closer
    to s, both landing at s:
        L_eps = E || f_theta(x_t, t, s) - f_theta^-(x_t', t', s) ||^2,
        t' = t + eps (s - t),   x_t' = x_t + (t' - t) v(x_t, t).
    Taylor-expanding f^-(x_t', t', s) around (x_t, t) along the ODE gives
        f_theta - f^-(x_t', t', s) = eps (t - s) df^-/dt + O(eps^2),
    so grad L_eps / eps -> 2 E[(t - s) grad_theta f^T df^-/dt] (the theorem's |t-s| sign(t-s)).

    The total derivative along the teacher ODE, s held fixed. With f = x_t + (s - t) F:
        df/dt = dx_t/dt - F + (s - t) dF/dt = (v - F) + (s - t) dF/dt,
        dF/dt = (grad_x F) v + d_t F     = JVP of F at (x_t, t, s) with tangent (v, 1, 0).
    dF^-/dt comes from the forward pass of F_theta itself (jvp.value_and_jvp): theta^- = theta, so
    F^- = sg(F_theta) and the tangent, taken without graph, is the stop-gradient network's.

    Since grad_theta f = (s - t) grad_theta F, the limit gradient is
        -2 E[(t - s)^2 grad_theta F^T df^-/dt]:   descent moves F along +df^-/dt.

    Surrogate. With T = (v - F^-) + r (s - t) dF^-/dt and g = T / (||T|| + c), the loss
        ||F_theta - sg(F^- + g)||^2   has gradient   -2 grad_theta F^T g,
    the limit gradient with df/dt replaced by its normalized version (r = 1, c = None: exactly
    df/dt). The per-sample factor (t - s)^2 is left to the weighting, like sCM, because tangent
    normalization removes per-sample scales anyway. The loss *value* is meaningless (~||g||^2);
    only its gradient matters.

    r: tangent warmup coefficient (sCM Sec. 4.2; see tangent_warmup), 0 -> 0.99 early in training.
    c: tangent normalization constant; None disables normalization.
    Checks (tests/): at s = t, T = v - F, the flow-matching gradient; at the exact flow map, T = 0.
    With s = 0 this is the continuous-time consistency-model objective (sCM) on the linear path.
    """
    with torch.no_grad():
        v = velocity(x_t, t, **cond)                                    # (N, ...) teacher, maybe guided
    F, dF_dt = value_and_jvp(lambda x, t_, s_: net(x, t_, s_, **cond),
                             (x_t, t, s), (v, torch.ones_like(t), None), jvp_method)   # tangent (v, 1, 0)
    with torch.no_grad():
        F_sg = F.detach()                                               # F^-
        T = (v - F_sg) + r * bcast(s - t, x_t) * dF_dt                  # df^-/dt, warmed up
        target = F_sg + _normalize(T, c)
    return _per_sample_mse(F, target)


def lmd_loss(net, velocity, x_t, t, s, c=0.1, jvp_method="exact", data_range=None, **cond):
    """AYF-LMD, Lagrangian map distillation (AYF Sec. 3.1, Lagrangian theorem). Per-sample surrogate.

    Derivation: docs/method.md §4.

    Discrete form. Map from t to a point s' slightly beyond s, then take one teacher Euler step
    from s' back to s:
        L_eps = E || f_theta(x_t, t, s) - [y + (s - s') v(y, s')] ||^2,
        s' = s + eps (t - s),   y = f_theta^-(x_t, t, s').
    Expanding y = f^- + (s' - s) df^-/ds + O(eps^2) and v(y, s') = v(f^-, s) + O(eps),
        f_theta - target = -eps (t - s) h + O(eps^2),   h = df^-/ds - v(f^-(x_t, t, s), s),
    so grad L_eps / eps -> -2 E[(t - s) grad_theta f^T h] = 2 E[(t - s)^2 grad_theta F^T h]:
    descent moves F along -h.

    Pieces. With f = x_t + (s - t) F:
        df/ds = F + (s - t) dF/ds,   dF/ds = JVP of F at (x_t, t, s) with tangent (0, 0, 1),
    plus one teacher evaluation at the predicted point, v(f^-(x_t, t, s), s). h is the residual of
    the ODE in the map's end time; it vanishes for the exact flow map, whose end point moves with
    the ODE as s changes.

    Surrogate. ||F_theta - sg(F^- - h~)||^2 with h~ = h / (||h|| + c) has gradient 2 grad F^T h~,
    the limit gradient with h normalized like EMD's tangent (our choice; the (t - s)^2 factor is
    left to the weighting). Checks: at s = t, h = F - v (flow matching); at the exact map, h = 0.

    The teacher at the predicted point (docs/method.md §4). v(f^-, s) is the one teacher query that
    need not be on the data's path: f^- is the student's guess, and where it leaves the data region
    the teacher extrapolates. If its x0-prediction D = f^- - s v there overshoots f^- (a guided
    teacher's can), it pulls f^- toward the data faster than 1 / (t - s), and then descent grows F
    along itself: f^- moves further out and F drifts without bound while the normalized loss stays
    O(1) (README, 'LMD divergence'). data_range = (lo, hi), the
    box that holds the data, projects D onto it (flowmap.velocity_in_range). That is the identity
    wherever the teacher's D is in range, so the derivation and checks above are untouched there,
    and it makes the teacher ODE, hence LMD's fixed point, land within (s / t) x_t + (1 - s / t) [lo, hi].
    """
    F, dF_ds = value_and_jvp(lambda x, t_, s_: net(x, t_, s_, **cond),
                             (x_t, t, s), (None, None, torch.ones_like(s)), jvp_method)   # tangent (0, 0, 1)
    with torch.no_grad():
        F_sg = F.detach()                                               # F^-
        f_sg = x_t + bcast(s - t, x_t) * F_sg                           # f^-(x_t, t, s)
        df_ds = F_sg + bcast(s - t, x_t) * dF_ds
        v_f = velocity(f_sg, s, **cond)                                 # the teacher at the predicted point
        if data_range is not None:
            v_f = velocity_in_range(v_f, f_sg, s, data_range)           # its x0-prediction kept in range
        h = df_ds - v_f                                                 # ODE residual at the end point
        target = F_sg - _normalize(h, c)
    return _per_sample_mse(F, target)


# ----------------------------------------------------------------------------------------------
# Training schedule pieces.

def tangent_warmup(step, warmup_steps, r_max=0.99):
    """Regularized tangent warmup (sCM Sec. 4.2; AYF Sec. 3.2): r rises linearly from 0 to r_max.

    r_max < 1 keeps a small permanent flow-matching pull of F toward v (AYF's regularization).
    """
    if warmup_steps <= 0:
        return r_max
    return r_max * min(1.0, step / warmup_steps)


def sample_t_s(n, dist="uniform", P_mean=-0.8, P_std=1.0, p_diag=0.0, p_zero=0.0,
               generator=None, device=None, t_min=0.0, t_max=1.0, power=1.0):
    """Draw (t, s) pairs with 1 >= t >= s >= 0 for flow-map training (docs/method.md §5, a choice).

    dist="uniform":     t, s two U[0, 1] draws, sorted (uniform on the triangle t >= s).
    dist="logitnormal": two draws with logit(u) ~ N(P_mean, P_std^2), sorted. On the linear path
                        logit(t) = log(t / (1 - t)) = log sigma, so this is EDM's log-normal
                        noise-level distribution.
    power: both draws are raised to it (u -> u^power, order kept); power > 1 moves the pairs toward
    t = 0, the data end, where the velocity of thin structure changes fastest. For dist="uniform",
    P(t <= x) = x^(2 / power).
    Then a fraction p_diag of pairs gets s = t (flow matching) and a fraction p_zero gets s = 0
    (consistency-model pairs). [t_min, t_max]: the teacher's time range (EDM2: [0.002, 80] in sigma);
    the two draws are mapped affinely onto it, so the teacher is only asked inside it, except s = 0
    of the p_zero pairs, where only the student's s input sees 0 (EMD; LMD would evaluate the
    teacher there).
    """
    if dist == "uniform":
        u = torch.rand(2, n, generator=generator, device=device)
    elif dist == "logitnormal":
        u = torch.sigmoid(P_mean + P_std * torch.randn(2, n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown (t, s) distribution {dist!r}; use 'uniform' or 'logitnormal'")
    u = t_min + (t_max - t_min) * u ** power
    t, s = u.max(dim=0).values, u.min(dim=0).values
    pick = torch.rand(n, generator=generator, device=device)
    s = torch.where(pick < p_diag, t, s)
    s = torch.where((pick >= p_diag) & (pick < p_diag + p_zero), torch.zeros_like(s), s)
    return t, s


class AdaptiveWeight(torch.nn.Module):
    """Learned adaptive weighting over (t, s) (EDM2 Sec. 5 / sCM Sec. 4.2, Eq. 'exp(-u) L + u').

    A tiny head predicts a log-variance u(t, s); minimizing exp(-u) L + u sets exp(u) to the running
    mean of L at that (t, s), so every region of the (t, s) triangle contributes a comparable
    gradient. Starts at u = 0 (plain loss).
    """

    def __init__(self, channels=64, max_freq=4.0):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.linspace(1.0, max_freq, channels // 4))
        self.linear = torch.nn.Linear(channels, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, loss, t, s):
        ft, fs = torch.outer(t, self.freqs), torch.outer(s, self.freqs)   # (N, C/4) each
        u = self.linear(torch.cat([ft.sin(), ft.cos(), fs.sin(), fs.cos()], dim=1)).squeeze(1)
        return torch.exp(-u) * loss + u                                 # (N,)


# ----------------------------------------------------------------------------------------------
# Adversarial finetuning: relativistic pairing GAN with R1 / R2 (R3GAN, Huang et al. 2025; AYF Sec. 3.3).

def rpgan_d_loss(d_real, d_fake):
    """Discriminator: softplus(D(fake) - D(real)), low when real scores exceed paired fake scores."""
    return nnf.softplus(d_fake - d_real)


def rpgan_g_loss(d_real, d_fake):
    """Generator: softplus(D(real) - D(fake)), the same pairing with the roles swapped."""
    return nnf.softplus(d_real - d_fake)


def grad_penalty(D, x, **cond):
    """R1 (x real) or R2 (x fake) penalty: ||grad_x D(x)||^2 per sample; weight it by gamma / 2."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(x, **cond).sum(), x, create_graph=True)
    return g.square().flatten(1).sum(dim=1)                             # (N,)
