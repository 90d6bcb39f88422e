"""Exact teachers and exact flow maps for tests (docs/method.md §2). Helpers, not tests.

Gaussian data x0 ~ N(mu, c^2 I) on the linear path x_t = (1 - t) x0 + t eps has Gaussian marginals
    x_t ~ N(m_t, sd_t^2 I),   m_t = (1 - t) mu,   sd_t = sqrt((1 - t)^2 c^2 + t^2).
The probability-flow ODE conserves the standardized coordinate (x - m_t) / sd_t, so
    Phi(x, t, s) = m_s + (sd_s / sd_t) (x - m_t)
    v(x, t)      = d/dt Phi(x, t', t)|_{t'=t} = -mu + (t - (1 - t) c^2) / sd_t^2 (x - m_t).

The average velocity F = (Phi - x) / (s - t) of the Euler parameterization f = x + (s - t) F:
    Phi - x = (m_s - m_t) + (sd_s - sd_t) / sd_t (x - m_t),   m_s - m_t = (t - s) mu,
    sd_s - sd_t = (sd_s^2 - sd_t^2) / (sd_s + sd_t) = (s - t) [(s + t) - (2 - s - t) c^2] / (sd_s + sd_t),
    F = -mu + [(s + t) - (2 - s - t) c^2] / ((sd_s + sd_t) sd_t) (x - m_t),
which has no 0/0 at s = t, where it reduces to v (sd_s + sd_t = 2 sd_t).

A Gaussian mixture sum_k w_k N(mu_k, c_k^2 I) has velocity sum_k r_k(x, t) v_k(x, t), with r_k the
posterior responsibility of component k given x_t = x; its flow map is solved with RK4 in float64.
"""
import math

import torch


def gaussian_stats(t, mu, c):
    """Marginal mean and std of x_t for x0 ~ N(mu, c^2 I): (m_t (N, D), sd_t (N, 1))."""
    t = t.reshape(-1, 1)
    return (1 - t) * mu, ((1 - t) ** 2 * c ** 2 + t ** 2).sqrt()


def gaussian_velocity(x, t, mu, c):
    """Exact v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(mu, c^2 I); x (N, D), t (N,)."""
    m_t, sd_t = gaussian_stats(t, mu, c)
    t = t.reshape(-1, 1)
    return -mu + (t - (1 - t) * c ** 2) / sd_t ** 2 * (x - m_t)


def gaussian_phi(x, t, s, mu, c):
    """Exact flow map Phi(x, t, s) = m_s + (sd_s / sd_t)(x - m_t); x (N, D), t and s (N,)."""
    m_t, sd_t = gaussian_stats(t, mu, c)
    m_s, sd_s = gaussian_stats(s, mu, c)
    return m_s + sd_s / sd_t * (x - m_t)


class GaussianFlowMap(torch.nn.Module):
    """The exact average velocity F(x, t, s) of Gaussian data, with learnable (mu, log c).

    At the true parameters it is the exact flow map of N(mu, c^2 I) data, so a distillation loss
    evaluated on it (with the exact teacher) must have zero gradient; off them it is a perturbed
    student whose loss gradient can be checked against the direction back to the truth.
    """

    def __init__(self, mu, log_c):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.as_tensor(mu).clone())             # (D,)
        self.log_c = torch.nn.Parameter(torch.as_tensor(log_c).clone())       # ()

    def forward(self, x, t, s):
        c = self.log_c.exp()
        m_t, sd_t = gaussian_stats(t, self.mu, c)
        _, sd_s = gaussian_stats(s, self.mu, c)
        t, s = t.reshape(-1, 1), s.reshape(-1, 1)
        return -self.mu + ((s + t) - (2 - s - t) * c ** 2) / ((sd_s + sd_t) * sd_t) * (x - m_t)


def mixture_velocity(x, t, weights, means, stds):
    """Exact velocity of a mixture of isotropic Gaussians sum_k w_k N(means[k], stds[k]^2 I).

    x (N, D), t (N,), weights (K,), means (K, D), stds (K,). Responsibilities come from the
    marginal densities N(x; m_{t,k}, sd_{t,k}^2 I), evaluated in log space.
    """
    N, D = x.shape
    t = t.reshape(-1, 1, 1)                                                     # (N, 1, 1)
    m = (1 - t) * means                                                         # (N, K, D)
    var = (1 - t[..., 0]) ** 2 * stds ** 2 + t[..., 0] ** 2                     # (N, K)
    diff = x[:, None, :] - m                                                    # (N, K, D)
    log_p = weights.log() - 0.5 * D * torch.log(2 * math.pi * var) - 0.5 * diff.square().sum(-1) / var
    r = (log_p - log_p.logsumexp(dim=1, keepdim=True)).exp()                    # (N, K) responsibilities
    v_k = -means + ((t[..., 0] - (1 - t[..., 0]) * stds ** 2) / var)[..., None] * diff
    return (r[..., None] * v_k).sum(dim=1)                                      # (N, D)


def rk4_flow_map(velocity, x, t, s, steps=200):
    """Phi(x, t, s) by classical RK4 with `steps` uniform steps; t, s are floats (same for all)."""
    h = (s - t) / steps
    full = lambda u: torch.full((len(x),), u, dtype=x.dtype)            # (N,) times for the velocity
    for i in range(steps):
        tau = t + i * h
        k1 = velocity(x, full(tau))
        k2 = velocity(x + 0.5 * h * k1, full(tau + 0.5 * h))
        k3 = velocity(x + 0.5 * h * k2, full(tau + 0.5 * h))
        k4 = velocity(x + h * k3, full(tau + h))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
