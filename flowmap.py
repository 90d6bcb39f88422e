"""The flow-map parameterization, guided teacher velocities, and every sampler.

Conventions (docs/method.md §1, AYF Sec. 2):
    x_t = (1 - t) x0 + t eps          t = 0 is data, t = 1 is noise
    v(x, t) = E[eps - x0 | x_t = x]   the teacher velocity; dx/dt = v is the probability-flow ODE
    f(x_t, t, s) = x_s                the flow map: jump from time t to time s along that ODE

Every network follows one calling convention, `net(x, t, s, **cond) -> F` with F shaped like x and
t, s tensors of shape (N,). Teachers are used through `velocity(x, t, **cond) -> v`; a flow-matching
network becomes one with `as_velocity(net)` (it is the same network evaluated at s = t).
"""
import torch


def bcast(t, x):
    """Reshape per-sample times t (N,) so they broadcast against x (N, ...)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def flow_map(net, x, t, s, **cond):
    """The flow map in AYF's Euler (average-velocity) form, Sec. 3 (docs/method.md §1):

        f(x_t, t, s) = x_t + (s - t) F(x_t, t, s).

    At s = t the map is the identity whatever F is, and F(x, t, t) plays the role of the velocity.
    """
    return x + bcast(s - t, x) * net(x, t, s, **cond)


def jump_excursion(net, z, data_range, t_max=1.0, **cond):
    """How far the 1-step jump f(x, t_max, 0) from x = t_max z (the sampler's start, time_grid) lands
    outside the data range [lo, hi]: the largest per-sample RMS of f - clamp(f, lo, hi) over the noise
    z (N, ...), a float.

    The exact map's 1-step jump is a data point, so this is 0 for it and |F(z, 1, 0) - z| stays
    within the data's extent. Training loops watch it as a divergence guard on F's magnitude: a
    drifting F leaves the normalized losses O(1) and shows up here long before any NaN.
    """
    lo, hi = data_range
    with torch.no_grad():
        start = torch.full((len(z),), t_max, device=z.device)
        f = flow_map(net, t_max * z, start, torch.zeros_like(start), **cond)
        return (f - torch.clamp(f, lo, hi)).float().square().flatten(1).mean(dim=1).sqrt().max().item()


def as_velocity(net):
    """A flow-matching network as a teacher velocity: v(x, t) = F(x, t, t)."""
    def velocity(x, t, **cond):
        return net(x, t, t, **cond)
    return velocity


def guided_velocity(velocity, weak, x, t, lam=None, **cond):
    """Guided teacher velocity (Autoguidance, Karras et al. 2024, Eq. 1; docs/method.md §6):

        v_guided = v_weak + lam (v - v_weak) = lam v + (1 - lam) v_weak

    `weak` is a worse copy of the teacher (autoguidance) or the unconditional teacher (CFG); both
    are velocities `weak(x, t, **cond)`. lam is a float or a per-sample tensor (N,). When every lam
    equals 1 the weak model is never called. Bind the two models with functools.partial to get a
    velocity with the usual signature `velocity(x, t, lam=..., **cond)`.
    """
    v = velocity(x, t, **cond)
    if lam is None:
        return v
    lam = torch.as_tensor(lam, dtype=v.dtype, device=v.device)
    if bool((lam == 1).all()):
        return v
    if weak is None:
        raise ValueError(f"guidance strength lam != 1 needs a weak model, got weak=None (lam = {lam})")
    if lam.ndim == 1:
        lam = bcast(lam, v)
    return torch.lerp(weak(x, t, **cond), v, lam)                       # v_weak + lam (v - v_weak)


def velocity_in_range(v, x, s, data_range, s_min=1e-3):
    """The teacher velocity v at (x, s) with its x0-prediction projected onto the data range [lo, hi]
    (docs/method.md §4, 'The teacher at the predicted point'):

        D = x - s v                            the x0-prediction, E[x0 | x_s = x] for the exact v
        v_in = v + (D - clamp(D, lo, hi)) / s  = (x - clamp(D, lo, hi)) / s

    The exact D is an average of data points, so it lies in [lo, hi]: this is the identity wherever
    the teacher's D does, and elsewhere never farther from the exact v (clamping is a projection onto
    a box that holds the exact D). lo, hi: numbers, or tensors that broadcast against x (per
    coordinate). At s = 0, D = x whatever v is, and the exact v off the data is infinite (x - D_exact
    over s = 0); there s_min stands in for s, so v_in points away from the range, steeply. It is
    Imagen's static thresholding of the x0-prediction (Saharia et al. 2022), written as a velocity.
    """
    lo, hi = data_range
    s = bcast(s, x)
    D = x - s * v                                                       # (N, ...) x0-prediction
    return v + (D - torch.clamp(D, lo, hi)) / torch.where(s > 0, s, s_min)


def time_grid(steps, device=None, dtype=torch.float32, t_max=1.0):
    """t_max = t_0 > t_1 > ... > t_N = 0, uniform in t (AYF samples with uniform steps in t).

    t_max < 1 for a teacher trained on t <= t_max, such as EDM2 (t_max = 80 / 81, sigma_max = 80;
    docs/method.md §8 for the samplers):
    sampling then starts from x = t_max z, z ~ N(0, I). That is exact for EDM: it starts from
    x_sigma = sigma_max z, and x_t = (1 - t) x_sigma. It is not exactly a draw of x_{t_max} =
    (1 - t_max) x0 + t_max z, since the data term, of std sigma_data / 81 ~ 0.006, is left out.
    For Gaussian data N(mu, c^2) the exact ODE then ends at std c t_max / sd_{t_max} (relative
    error (c / sigma_max)^2 / 2 = 2e-5) with the mean shrunk by c (1 - t_max) / sd_{t_max} ~ c / 80
    (tests/test_edm2.py checks both). The last step ends at s = 0 exactly.
    """
    return torch.linspace(t_max, 0.0, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def sample_flow_map(net, z, steps, grid=None, **cond):
    """Deterministic multistep flow-map sampling (docs/method.md §8): x_{i+1} = f(x_i, t_i, t_{i+1}).

    No re-noising, so each step only has to be accurate on its own interval. NFE = steps.
    """
    grid = time_grid(steps, z.device, z.dtype) if grid is None else grid
    x = z
    for t, s in zip(grid[:-1], grid[1:]):
        x = flow_map(net, x, t.expand(len(x)), s.expand(len(x)), **cond)
    return x


@torch.no_grad()
def sample_consistency(net, z, steps, grid=None, noise=torch.randn_like, **cond):
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1), for the baseline:

        x0_hat = f(x_t, t, 0),   then re-noise   x_{t'} = (1 - t') x0_hat + t' z',  z' ~ N(0, I).

    `noise(x)` draws z'; pass a seeded function to make samples reproducible. NFE = steps.
    """
    grid = time_grid(steps, z.device, z.dtype) if grid is None else grid
    x = z
    for t, t_next in zip(grid[:-1], grid[1:]):
        x0_hat = flow_map(net, x, t.expand(len(x)), torch.zeros_like(t).expand(len(x)), **cond)
        x = (1 - t_next) * x0_hat + t_next * noise(x0_hat) if t_next > 0 else x0_hat
    return x


@torch.no_grad()
def sample_gamma(net, z, steps, gamma, grid=None, noise=torch.randn_like, **cond):
    """gamma-sampling (CTM, Kim et al. 2024), linear-path form (docs/method.md §8, derived):

    To go from t to s, jump deterministically to s' < s with the flow map, then add noise back:
        s' / (1 - s') = sqrt(1 - gamma^2) s / (1 - s)              (signal-to-noise of s' vs s)
        x_s = (1 - s) / (1 - s') f(x_t, t, s') + gamma s z
    The noise variance matches: ((1 - s) s' / (1 - s'))^2 + gamma^2 s^2 = s^2. gamma = 0 is the
    deterministic flow-map sampler; gamma = 1 is consistency-model sampling (s' = 0).
    """
    grid = time_grid(steps, z.device, z.dtype) if grid is None else grid
    x = z
    for t, s in zip(grid[:-1], grid[1:]):
        k = (1 - gamma ** 2) ** 0.5 * s / (1 - s)                       # noise-to-signal ratio of s'
        s_prime = k / (1 + k)
        x = flow_map(net, x, t.expand(len(x)), s_prime.expand(len(x)), **cond)
        if s > 0:
            x = (1 - s) / (1 - s_prime) * x + gamma * s * noise(x)
    return x


@torch.no_grad()
def sample_ode(velocity, z, steps, method="heun", grid=None, **cond):
    """Teacher reference samples: integrate dx/dt = v(x, t) from t = 1 to 0.

    Euler uses `steps` velocity evaluations; Heun (EDM's 2nd-order sampler) uses 2 * steps - 1,
    since its last step, which ends at t = 0, is a plain Euler step as in EDM. The velocity is
    never evaluated at t = 0, where an EDM denoiser's v = (x - D) / t is undefined; that last
    step is x - t v(x, t) = D(x / (1 - t), sigma(t)): it returns the denoiser's output (EDM's
    last step too).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; use 'euler' or 'heun'")
    grid = time_grid(steps, z.device, z.dtype) if grid is None else grid
    x = z
    for t, s in zip(grid[:-1], grid[1:]):
        t_, s_ = t.expand(len(x)), s.expand(len(x))
        d = velocity(x, t_, **cond)
        x_next = x + (s - t) * d
        if method == "heun" and s > 0:
            x_next = x + (s - t) * 0.5 * (d + velocity(x_next, s_, **cond))
        x = x_next
    return x
