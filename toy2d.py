"""AYF on a 2D toy, end to end on a CPU: the front door of this repository.

    python toy2d.py          # trains 5 models (timed in the README); a rerun reuses them
    python toy2d.py --methods emd,cm --retrain --steps 1,2,4
    python toy2d.py --teacher mlp    # distill the trained MLP (with a trained weak guide) instead

Data: a class-conditional Gaussian mixture (two interleaved spirals of small components), so the
exact teacher velocity and the exact flow map are known (docs/method.md §2). The script trains an
MLP by flow matching (with label dropout, so CFG works; logit-normal times, so most of them fall
where the thin components are told apart): the students start from it. They distill the exact
velocity, autoguided by the exact velocity of a blurred mixture (--teacher mlp: the MLP, guided by
a smaller MLP trained shorter): flow maps by AYF-EMD (lam ~ U[1, 3] given to the student), AYF-LMD
and the consistency-model baseline (EMD with s = 0), in parallel processes, and finally a short
adversarial finetune of the EMD map. Each model is evaluated at 1, 2, 4, 8, 16 steps: the sliced
Wasserstein distance of its samples to the data (averaged over 4 reference sets) and the error
against the exact ODE endpoint from the same noise.
"""
import argparse
import copy
import functools
import json
import math
import multiprocessing
import os
import pickle
import time
import zlib

import numpy as np
import torch
from tqdm import tqdm

from flowmap import (as_velocity, flow_map, guided_velocity, jump_excursion, sample_consistency,
                     sample_flow_map, sample_ode)
from losses import (AdaptiveWeight, emd_loss, fm_loss, grad_penalty, lmd_loss, rpgan_d_loss,
                    rpgan_g_loss, sample_t_s, tangent_warmup)

# ----------------------------------------------------------------------------------------------
# The data: a class-conditional Gaussian mixture with an exact velocity and flow map.

NUM_CLASSES = 2
STUDENTS = ("emd", "lmd", "cm", "adv")          # flow maps, cached with their adaptive weighting head


def make_mixture(components_per_class=24, std=0.06):
    """Two interleaved spirals (one per class) of small isotropic Gaussians.

    Returns means (K, 2), stds (K,), component class (K,), all float64. Every component of a class
    has equal weight.
    """
    means, classes = [], []
    for k in range(NUM_CLASSES):
        theta = torch.linspace(0.25 * math.pi, 2.75 * math.pi, components_per_class, dtype=torch.float64)
        radius = 0.35 + 0.3 * theta / math.pi
        angle = theta + k * math.pi
        means.append(torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1))
        classes.append(torch.full((components_per_class,), k))
    means = torch.cat(means)
    return means, torch.full((len(means),), std, dtype=torch.float64), torch.cat(classes)


MEANS, STDS, COMPONENT_CLASS = make_mixture()
# Where the data lie, per coordinate: the components' means +- 4 std. The divergence guard checks that
# the flow maps' 1-step jumps land in it.
DATA_RANGE = ((MEANS.min(0).values - 4 * STDS.max()).float(), (MEANS.max(0).values + 4 * STDS.max()).float())


def sample_data(n, label, generator=None):
    """x0 ~ p(x0 | label) for integer labels (n,)."""
    comp = torch.empty(n, dtype=torch.long)
    per_class = (COMPONENT_CLASS == 0).sum().item()
    pick = torch.randint(per_class, (n,), generator=generator)
    for k in range(NUM_CLASSES):
        comp[label == k] = torch.nonzero(COMPONENT_CLASS == k).squeeze(1)[pick[label == k]]
    x0 = MEANS[comp] + STDS[comp, None] * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return x0.float()


def _component_log_density(x, t, means, stds):
    """log N(x; (1 - t) mu_k, sd_k(t)^2 I) for the given components: (N, K), and sd_k(t)^2 (N, K).

    ||x - (1 - t) mu_k||^2 is expanded into matrix products so no (N, K, 2) tensor is formed.
    """
    tt = t[:, None]                                                     # (N, 1)
    var = (1 - tt) ** 2 * stds[None] ** 2 + tt ** 2                     # (N, K) sd_t^2
    dist2 = (x.square().sum(1, keepdim=True) - 2 * (1 - tt) * (x @ means.T)
             + (1 - tt) ** 2 * means.square().sum(1)[None])             # (N, K) ||x - m_t||^2
    return -0.5 * dist2 / var - torch.log(2 * math.pi * var), var


def exact_velocity(x, t, label, blur=1.0):
    """Exact v(x, t | label) = E[eps - x0 | x_t = x, label] (docs/method.md §2), float64.

    Each component's velocity is the Gaussian one, -mu_k + gain_k (x - (1 - t) mu_k) with
    gain_k = (t - (1 - t) c_k^2) / sd_k(t)^2; the mixture's is their sum weighted by the posterior
    responsibilities r_k of the class's components:
        v = (sum_k r_k gain_k) x - sum_k r_k (1 + (1 - t) gain_k) mu_k.
    label -1 is the unconditional mixture (all components, equal weights: the classes are equal).
    blur multiplies every component's std c_k: a mixture that is resolved less well.
    """
    x, t = x.double(), t.double()
    v = torch.empty_like(x)
    for k in label.unique().tolist():
        rows, comp = label == k, (COMPONENT_CLASS == k) | (k == -1)
        means, stds, tt = MEANS[comp], blur * STDS[comp], t[rows, None]
        log_p, var = _component_log_density(x[rows], t[rows], means, stds)
        resp = (log_p - log_p.logsumexp(dim=1, keepdim=True)).exp()     # (n, K) posterior over components
        gain = (tt - (1 - tt) * stds[None] ** 2) / var                  # (n, K)
        v[rows] = (resp * gain).sum(1, keepdim=True) * x[rows] - (resp * (1 + (1 - tt) * gain)) @ means
    return v


def exact_teacher(blur=1.0):
    """The exact velocity as a teacher with the networks' convention, velocity(x, t, label) -> v (x's dtype).

    label is one-hot (N, NUM_CLASSES); an all-zero row asks for the unconditional mixture (CFG's weak
    model). blur > 1 widens every component: the same teacher resolving the data less well, which
    is what autoguidance wants of its guide (docs/method.md §6).
    """
    def velocity(x, t, label):
        k = torch.where(label.sum(1) > 0, label.argmax(1), -1)          # (N,) class, -1: unconditional
        return exact_velocity(x, t, k, blur).to(x.dtype)
    return velocity


def exact_flow(x, t0, t1, label, steps=40):
    """The exact flow map Phi(x, t0, t1): RK4 on the exact velocity (docs/method.md §2), float64.

    The grid is uniform in sqrt(t), dense near t = 0 where the thin components make the velocity
    change fastest: 40 steps are within 4e-4 of 400 uniform steps (max over 2,000 points), far
    below the errors measured, at a tenth of the cost.
    """
    x = x.double()
    lo, hi = min(t0, t1), max(t0, t1)
    grid = lo + (hi - lo) * torch.linspace(0, 1, steps + 1, dtype=torch.float64) ** 2
    grid = grid.flip(0) if t0 > t1 else grid                            # from t0 to t1
    ones = torch.ones(len(x), dtype=torch.float64)
    for t, s in zip(grid[:-1].tolist(), grid[1:].tolist()):
        h = s - t
        k1 = exact_velocity(x, ones * t, label)
        k2 = exact_velocity(x + 0.5 * h * k1, ones * (t + 0.5 * h), label)
        k3 = exact_velocity(x + 0.5 * h * k2, ones * (t + 0.5 * h), label)
        k4 = exact_velocity(x + h * k3, ones * s, label)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x.float()


def log_likelihood(x, label):
    """Mean log p(x | label) under the true mixture: high when samples sit on the components."""
    x, total = x.double(), 0.0
    for k in range(NUM_CLASSES):
        rows, comp = label == k, COMPONENT_CLASS == k
        log_p, _ = _component_log_density(x[rows], torch.zeros(int(rows.sum()), dtype=torch.float64),
                                          MEANS[comp], STDS[comp])
        total += (log_p.logsumexp(dim=1) - math.log(int(comp.sum()))).sum().item()
    return total / len(x)


def _directions(projections, seed):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(2, projections, generator=g, dtype=torch.float64)
    return dirs / dirs.norm(dim=0)                                      # (2, projections) unit vectors


def _sorted_projections(x, label, dirs):
    """Per class, the points projected on every direction, sorted: [(projections, n_k)] * classes."""
    return [np.sort((dirs.T @ x[label == k].double().T).numpy(), axis=1)   # numpy sorts 6x faster
            for k in range(NUM_CLASSES)]


def _sliced_w2(pa, pb):
    """Sliced W2 from sorted projections (equal counts per class), averaged over classes."""
    out = [float(np.sqrt(np.square(a[:, :n] - b[:, :n]).mean()))
           for a, b in zip(pa, pb) for n in [min(a.shape[1], b.shape[1])]]
    return sum(out) / len(out)


def sliced_wasserstein(a, b, label_a, label_b, projections=256, seed=0):
    """Sliced 2-Wasserstein distance per class, averaged over classes (equal sample counts)."""
    dirs = _directions(projections, seed)
    return _sliced_w2(_sorted_projections(a, label_a, dirs), _sorted_projections(b, label_b, dirs))


class DistanceToData:
    """x -> sliced W2 of x to several reference data sets, averaged over them.

    One set of 10k data points is a noisy reference: with 48 thin components the per-component
    counts fluctuate, and data-vs-data distances range over 0.012-0.017 from draw to draw. The
    average over a few reference sets removes most of the reference's share of that noise. The
    floor is the same average for fresh data sets.
    """

    def __init__(self, refs, label, projections=256, seed=0):
        self.label, self.dirs = label, _directions(projections, seed)
        self.refs = [_sorted_projections(r, label, self.dirs) for r in refs]

    def __call__(self, x):
        px = _sorted_projections(x, self.label, self.dirs)
        return sum(_sliced_w2(px, ref) for ref in self.refs) / len(self.refs)


# ----------------------------------------------------------------------------------------------
# The network: one MLP for teacher, guide and flow maps, following net(x, t, s, label, lam) -> F.

class MLP(torch.nn.Module):
    """F(x, t, s | label, lam) for 2D points.

    t (and s, lam when the network takes them) enter through low-frequency Fourier features (modest
    bandwidth keeps dF/dt tame, docs/method.md §5). The student's new inputs s and lam enter through
    zero-initialized projections, so a student loaded from a teacher starts as F(x, t, s) = v(x, t).
    label is one-hot (N, NUM_CLASSES); an all-zero row means unconditional (CFG's weak model).
    """

    def __init__(self,
                 hidden=256,                # width of every hidden layer
                 depth=4,                   # number of hidden layers
                 cond_s=False,              # takes the target time s (flow map) or not (teacher)
                 cond_lam=False,            # takes the guidance strength lam
                 freqs=8,                   # Fourier features per time input
                 x_octaves=0):              # Fourier features of x: 8 directions x this many octaves
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, freqs + 1, dtype=torch.float32))
        angle = math.pi * torch.arange(8) / 8                            # 8 directions over a half turn
        octave = math.pi * 2.0 ** torch.arange(x_octaves)                # pi, 2 pi, 4 pi, ... per unit of x
        self.register_buffer("x_freqs", (torch.stack([angle.cos(), angle.sin()])[:, :, None] * octave).flatten(1))
        self.embed_x = torch.nn.Linear(2 + 2 * self.x_freqs.shape[1], hidden)
        self.embed_t = torch.nn.Linear(2 * freqs, hidden)
        self.embed_label = torch.nn.Linear(NUM_CLASSES, hidden, bias=False)
        self.embed_s = torch.nn.Linear(2 * freqs, hidden, bias=False) if cond_s else None
        self.embed_lam = torch.nn.Linear(2 * freqs, hidden, bias=False) if cond_lam else None
        for branch in (self.embed_s, self.embed_lam):
            if branch is not None:
                torch.nn.init.zeros_(branch.weight)
        self.body = torch.nn.Sequential(*[m for _ in range(depth - 1)
                                          for m in (torch.nn.SiLU(), torch.nn.Linear(hidden, hidden))])
        self.out = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden, 2))

    def fourier(self, t):
        angle = t[:, None] * self.freqs                                 # (N, freqs)
        return torch.cat([angle.sin(), angle.cos()], dim=1)             # (N, 2 freqs)

    def features_x(self, x):
        angle = x.matmul(self.x_freqs)                                  # (N, 8 octaves)
        return torch.cat([x, angle.sin(), angle.cos()], dim=1)          # (N, 2 + 16 octaves)

    def forward(self, x, t, s, label=None, lam=None):
        h = self.embed_x(self.features_x(x)) + self.embed_t(self.fourier(t))   # (N, hidden)
        if label is not None:
            h = h + self.embed_label(label)
        if self.embed_s is not None:
            h = h + self.embed_s(self.fourier(s))
        if self.embed_lam is not None and lam is not None:
            h = h + self.embed_lam(self.fourier((lam - 1) / 4))         # lam in [1, 3] -> [0, 0.5]
        return self.out(self.body(h))


def student_from(teacher, **kw):
    """A flow-map student initialized from the teacher (sCM / AYF): F(x, t, s) = v(x, t) at step 0."""
    student = MLP(cond_s=True, cond_lam=True, **kw)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("embed_s", "embed_lam")) for k in missing), (missing, unexpected)
    return student


def one_hot(label):
    return torch.nn.functional.one_hot(label, NUM_CLASSES).float()


# ----------------------------------------------------------------------------------------------
# Training.

def sample_t(n, dist, P_mean, P_std, g):
    """Teacher training times: uniform, or logit-normal, logit(t) ~ N(P_mean, P_std^2) (docs/method.md §5).

    logit(t) = log(t / (1 - t)) is the log noise level of the linear path, so a negative P_mean puts
    more samples near t = 0, where the velocity has to tell neighbouring thin components apart.
    """
    if dist == "uniform":
        return torch.rand(n, generator=g)
    return torch.sigmoid(P_mean + P_std * torch.randn(n, generator=g))


def train_teacher(net, steps, batch, lr, label_dropout, g, desc, t_dist="uniform", P_mean=0.0, P_std=1.0):
    """Flow matching with label dropout (so the same network is also the unconditional model)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc=desc, leave=False):
        label = torch.randint(NUM_CLASSES, (batch,), generator=g)
        x0, eps = sample_data(batch, label, g), torch.randn(batch, 2, generator=g)
        t = sample_t(batch, t_dist, P_mean, P_std, g)
        keep = (torch.rand(batch, 1, generator=g) >= label_dropout).float()
        loss = fm_loss(net, x0, eps, t, label=one_hot(label) * keep).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net


def train_flow_map(student, velocity, args, g, desc, objective, adv=None, weight_state=None):
    """Distill `velocity` (lam-guided) into the flow map `student` with AYF-EMD, AYF-LMD or the CM baseline.

    objective: 'emd', 'lmd', or 'cm' (emd_loss with s = 0: the continuous-time consistency model).
    adv: None, or (discriminator, steps) for the adversarial finetuning stage (AYF Sec. 3.3), which
    adds a weighted RpGAN generator loss on 1- and 2-step samples, made at lam = args.adv_lam, to the
    EMD objective (why one lam: train_imagenet.py's adversarial.py).
    weight_state: the adaptive weighting head to go on with (the adv stage: the distilled one's).
    The distillation's lr decays linearly to 0 from objective_settings' lr (README, 'What moved the
    numbers'); the adversarial finetune keeps args.adv_student_lr.
    Returns the student with its EMA weights, and its weighting head as student.weight_state.
    """
    steps = adv[1] if adv else args.distill_steps
    weight = AdaptiveWeight() if args.weighting == "adaptive" else None
    if weight and weight_state is not None:
        weight.load_state_dict(weight_state)
    params = list(student.parameters()) + (list(weight.parameters()) if weight else [])
    setting = objective_settings(args, objective)
    lr = args.adv_student_lr if adv else setting["lr"]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), fused=True)    # fused: 3% faster here
    if adv:
        D, _ = adv
        opt_D = torch.optim.Adam(D.parameters(), lr=args.adv_lr, betas=(0.0, 0.99))
    ema = copy.deepcopy(student).requires_grad_(False)                  # evaluated weights (sCM, AYF)
    guard = divergence_guard(args)
    good_ema, good_step = copy.deepcopy(ema.state_dict()), 0
    for step in tqdm(range(steps), desc=desc, leave=False):
        if not adv:                                                     # distillation: lr decays linearly to 0
            opt.param_groups[0]["lr"] = lr * (1 - step / steps)
        label = torch.randint(NUM_CLASSES, (args.batch,), generator=g)
        lam = 1 + (args.lam_max - 1) * torch.rand(args.batch, generator=g)  # lam ~ U[1, lam_max], a student input
        cond = dict(label=one_hot(label), lam=lam)
        x0, eps = sample_data(args.batch, label, g), torch.randn(args.batch, 2, generator=g)
        t, s = sample_t_s(args.batch, args.ts_dist, P_mean=args.P_mean, P_std=args.P_std,
                          p_diag=args.p_diag, p_zero=args.p_zero, power=setting["ts_power"], generator=g)
        if objective == "cm":
            s = torch.zeros_like(s)                                     # consistency model: always jump to 0
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        if objective == "lmd":
            loss = lmd_loss(student, velocity, x_t, t, s, c=args.c, data_range=DATA_RANGE, **cond)
        else:
            r = tangent_warmup(step, setting["warmup"], args.r_max) if not adv else args.r_max
            loss = emd_loss(student, velocity, x_t, t, s, r=r, c=args.c, **cond)
        loss = weight(loss, t, s).mean() if weight else loss.mean()

        if adv:
            # Generator: 1- and 2-step samples from pure noise at the sampling lam (D's reals are
            # unguided data), paired with real samples of the same label.
            z = torch.randn(args.batch, 2, generator=g)
            ones, zeros, half = torch.ones(args.batch), torch.zeros(args.batch), torch.full((args.batch,), 0.5)
            fake_cond = dict(cond, lam=torch.full_like(lam, args.adv_lam))
            fake = torch.cat([flow_map(student, z, ones, zeros, **fake_cond),
                              flow_map(student, flow_map(student, z, ones, half, **fake_cond), half, zeros,
                                       **fake_cond)])
            real = torch.cat([x0, sample_data(args.batch, label, g)])
            lab2 = torch.cat([cond["label"]] * 2)
            loss = loss + args.adv_weight * rpgan_g_loss(D(real, label=lab2), D(fake, label=lab2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.lerp_(p, 1 - args.ema)

        if adv:
            # Discriminator: RpGAN with R1 (real) and R2 (fake) penalties.
            fake = fake.detach()
            d_loss = rpgan_d_loss(D(real, label=lab2), D(fake, label=lab2)).mean()
            d_loss = d_loss + args.adv_gamma / 2 * (grad_penalty(D, real, label=lab2)
                                                    + grad_penalty(D, fake, label=lab2)).mean()
            opt_D.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_D.step()

        excursion = guard(student)
        if excursion > guard.bound:
            print(f"{desc}: stopped at step {step + 1}: the 1-step jump f(z, 1, 0) lands {excursion:.3g} (RMS) "
                  f"outside the data range, more than its extent {guard.bound:.3g}: F(z, 1, 0) is diverging "
                  f"(README, 'LMD divergence'). Kept the EMA weights of step {good_step}.")
            ema.load_state_dict(good_ema)
            student.diverged_at = step + 1
            break
        if (step + 1) % 100 == 0:
            good_ema, good_step = copy.deepcopy(ema.state_dict()), step + 1
    student.load_state_dict(ema.state_dict())
    student.weight_state = weight.state_dict() if weight else None
    return student


def objective_settings(args, objective):
    """{lr, warmup, ts_power} an objective distills with: the flow maps' flags, or the CM baseline's
    own (sCM's tangent warmup and unsquared times; at the flow maps' lr it diverges: README)."""
    if objective == "cm":
        return dict(lr=args.cm_lr, warmup=args.cm_warmup, ts_power=args.cm_ts_power)
    return dict(lr=args.distill_lr, warmup=args.warmup, ts_power=args.ts_power)


def divergence_guard(args, n=64):
    """A per-step check of F's magnitude: guard(net) -> the 1-step jump's excursion outside DATA_RANGE
    (flowmap.jump_excursion) on fixed noise, half at lam = 1 and half at lam_max; guard.bound is the
    data's extent. The exact map gives 0; the normalized losses cannot show a drifting F."""
    g = torch.Generator().manual_seed(args.seed + 4242)               # own stream: training draws unchanged
    z = torch.randn(n, 2, generator=g)
    cond = dict(label=one_hot(torch.arange(n) % NUM_CLASSES),
                lam=torch.where(torch.arange(n) % 2 == 0, 1.0, args.lam_max))

    def guard(net):
        return jump_excursion(net, z, DATA_RANGE, **cond)
    guard.bound = (DATA_RANGE[1] - DATA_RANGE[0]).max().item()
    return guard


class Discriminator(torch.nn.Module):
    """The small adversarial head for 2D: an MLP on (x, label) -> score."""

    def __init__(self, hidden=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + NUM_CLASSES, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, x, label):
        return self.net(torch.cat([x, label], dim=1)).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Evaluation.

class Evaluation:
    """Every model at every step count (a row), sampled from the same noise and labels, scored against
    the same reference data and exact ODE endpoints.

    A row's sampler uses models[m] for the names m it needs; main() fills `models` in as they are
    trained, and start() evaluates, in forked processes beside the training, the rows whose models
    exist (README, Runtime). A row's numbers do not depend on the process that computes them.
    """

    def __init__(self, args, methods, steps_list, models):
        n, g = args.n_eval, torch.Generator().manual_seed(12345)
        self.label = torch.arange(n) % NUM_CLASSES
        self.z = torch.randn(n, 2, generator=g)
        self.data = sample_data(n, self.label, g)                       # shown in the figure
        self.distance = DistanceToData([sample_data(n, self.label, g) for _ in range(4)], self.label)
        self.floor = sum(self.distance(sample_data(n, self.label, g)) for _ in range(4)) / 4   # data vs data
        self.models, self.pending = models, []
        self.rows = self.make_rows(args, methods, steps_list)

    def make_rows(self, args, methods, steps_list):
        """(name, steps) -> (the models it needs, sampler(z, k) -> samples), in the tables' order."""
        models, rows, n, lam = self.models, {}, len(self.z), args.guidance
        ones, cond1 = torch.ones(n), dict(label=one_hot(self.label))
        teacher, ref_steps = ("v_teacher", "v_guide"), 32                # Heun: 63 teacher evaluations

        def add(name, needs, sampler, ks):
            rows.update({(name, k): (needs, functools.partial(sampler, k=k)) for k in ks})

        def guided(weak):                                               # lam v_teacher + (1 - lam) weak
            return functools.partial(guided_velocity, models["v_teacher"], weak)

        def renoise(k):                                     # CM's fresh noise: one stream per step count,
            g_k = torch.Generator().manual_seed(12345 + k)  # whichever process samples it
            return lambda x: torch.randn(x.shape, generator=g_k)

        add("exact ODE", (), lambda z, k: exact_flow(z, 1.0, 0.0, self.label, k), [40])   # the ideal teacher
        add("teacher ODE", teacher, lambda z, k: sample_ode(models["v_teacher"], z, k, "heun", **cond1), [ref_steps])
        if args.teacher == "exact":                                     # the students' start (not in the figure)
            add("MLP teacher ODE", ("teacher",), lambda z, k: sample_ode(
                as_velocity(models["teacher"]), z, k, "heun", **cond1), [ref_steps])
        titles = {"emd": "AYF-EMD", "lmd": "AYF-LMD", "cm": "consistency (EMD, s=0)", "adv": "AYF-EMD + adv"}
        for m in [m for m in STUDENTS if m in methods]:
            add(titles[m], (m,), lambda z, k, m=m: (
                sample_consistency(models[m], z, k, noise=renoise(k), lam=ones, **cond1) if m == "cm"
                else sample_flow_map(models[m], z, k, lam=ones, **cond1)), steps_list)
        add(f"teacher ODE, autoguided lam={lam:g}", teacher, lambda z, k: sample_ode(
            guided(models["v_guide"]), z, k, "heun", lam=lam * ones, **cond1), [ref_steps])
        add(f"teacher ODE, CFG lam={lam:g}", teacher, lambda z, k: sample_ode(
            guided(lambda x, t, label: models["v_teacher"](x, t, label=torch.zeros_like(label))),
            z, k, "heun", lam=lam * ones, **cond1), [ref_steps])
        if "emd" in methods:
            add(f"AYF-EMD, autoguided lam={lam:g}", ("emd",),
                lambda z, k: sample_flow_map(models["emd"], z, k, lam=lam * ones, **cond1), steps_list)
        return rows

    def evaluate(self, key):
        """Row key's samples, their distance to the data (sliced W2) and their log-likelihood."""
        x = self.rows[key][1](self.z)
        return x, self.distance(x), log_likelihood(x, self.label)

    def start(self, workers):
        """Start evaluating the rows whose models exist and that are not started yet, in `workers`
        forked processes beside this one (workers 0: none now, results() will)."""
        started = {key for keys, _ in self.pending for key in keys}
        ready = [key for key, (needs, _) in self.rows.items()
                 if key not in started and all(m in self.models for m in needs)]
        if workers and ready:
            self.pending.append((ready, start_in_processes([functools.partial(self.evaluate, key) for key in ready],
                                                           workers)))

    def results(self, workers):
        """Evaluate the rows not started yet (workers 1: in this process), wait for all of them, and
        return ({name: {steps: metrics}}, {name: {steps: samples}}) in the tables' order. The error
        against the exact ODE endpoint from the same noise is computed here: the exact ODE is a row."""
        self.start(workers if workers > 1 else 0)
        done = {key: out for keys, get in self.pending for key, out in zip(keys, get())}
        done.update({key: self.evaluate(key) for key in self.rows if key not in done})
        exact_end, _, _ = done[("exact ODE", 40)]
        results, samples = {}, {}
        for (name, k), (x, sw, loglik) in ((key, done[key]) for key in self.rows):
            results.setdefault(name, {})[k] = dict(sw=sw, err=(x - exact_end).norm(dim=1).mean().item(), loglik=loglik)
            samples.setdefault(name, {})[k] = x
        return results, samples


# ----------------------------------------------------------------------------------------------
# The run: cached models, the teacher, the students.

def cached(args, name, config, build, train, retrain=None):
    """build() a network and load args.out/name.pt into it if that was trained with `config`;
    otherwise train(net, g) and save it (unless it diverged)."""
    path = os.path.join(args.out, f"{name}.pt")
    net = build()
    retrain = args.retrain if retrain is None else retrain
    ckpt = None if retrain else checkpoint_for(path, name, config)
    if ckpt:
        net.load_state_dict(ckpt["state"])
        net.weight_state = ckpt.get("weight")
        print(f"{name}: loaded {path}")
        return net.eval()
    if not retrain and os.path.exists(path):
        print(f"{name}: config changed since {path} was written (or it predates the cached weighting); retraining")
    g = torch.Generator().manual_seed(args.seed * 1000 + zlib.crc32(name.encode()) % 1000)
    t0 = time.time()
    train(net, g)
    if getattr(net, "diverged_at", None):
        print(f"{name}: not cached (stopped at step {net.diverged_at}); evaluating its last good weights")
        return net.eval()
    torch.save(dict(config=config, state=net.state_dict(), weight=getattr(net, "weight_state", None)), path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"{name}: trained in {time.time() - t0:.1f}s -> {path}")
    return net.eval()


def checkpoint_for(path, name, config):
    """The checkpoint at path if it was trained with `config` (a student's with its weighting head), else None."""
    if not os.path.exists(path):
        return None
    ckpt = torch.load(path, weights_only=True)
    return ckpt if ckpt["config"] == config and (name not in STUDENTS or "weight" in ckpt) else None


def setup_teacher(args, size, models):
    """Train (or load) the teacher network into models["teacher"]; -> (teacher config, guide config).

    The teacher network, an MLP trained by flow matching, is what the students start from. With
    --teacher mlp it is also the velocity they distill, models["v_teacher"], guided by a smaller MLP
    trained shorter, models["v_guide"]. With --teacher exact they distill the mixture's exact
    velocity instead, guided by the exact velocity of the mixture with every component --guide-blur
    times wider: main() puts those in `models` before any training.
    """
    t_dist = dict(t_dist=args.teacher_t, P_mean=args.teacher_P_mean, P_std=args.teacher_P_std)
    base = dict(seed=args.seed, batch=args.teacher_batch, lr=args.teacher_lr, **t_dist)
    teacher_cfg, guide_cfg = dict(base, steps=args.teacher_steps, **size), dict(base, steps=args.guide_steps)
    models["teacher"] = cached(args, "teacher", teacher_cfg, lambda: MLP(**size), lambda n, g: train_teacher(
        n, args.teacher_steps, args.teacher_batch, args.teacher_lr, 0.1, g, "teacher", **t_dist)).requires_grad_(False)
    if args.teacher == "exact":
        return dict(teacher_cfg, velocity="exact"), dict(blur=args.guide_blur)
    guide = cached(args, "guide", guide_cfg, lambda: MLP(hidden=64, depth=3), lambda n, g: train_teacher(
        n, args.guide_steps, args.teacher_batch, args.teacher_lr, 0.1, g, "guide", **t_dist)).requires_grad_(False)
    models.update(v_teacher=as_velocity(models["teacher"]), v_guide=as_velocity(guide))
    return teacher_cfg, guide_cfg


def setup_students(args, methods, distill_cfg, build, velocity):
    """The flow maps emd, lmd, cm {method: net}, distilled from `velocity` or loaded from args.out.

    They are independent: up to --jobs of them train at once, each in a forked process that saves
    its checkpoint, which this process then loads (a student whose training diverged is not saved,
    so it is trained again here, and stops the same way).
    """
    # lmd's teacher x0-prediction is projected onto DATA_RANGE (lmd_loss): a checkpoint from before is stale
    own = dict(lmd=dict(x0_in_range=True), cm=objective_settings(args, "cm"))     # cm trains with its own
    configs = {m: dict(distill_cfg, objective=m, **own.get(m, {})) for m in ("emd", "lmd", "cm") if m in methods}
    jobs = {m: functools.partial(cached, args, m, config, build,
                                 lambda n, g, m=m: train_flow_map(n, velocity, args, g, m, m))
            for m, config in configs.items()}
    stale = [m for m, config in configs.items()
             if args.retrain or not checkpoint_for(os.path.join(args.out, f"{m}.pt"), m, config)]
    forked = args.jobs > 1 and len(stale) > 1
    if forked:                                                          # each saves its checkpoint, loaded below
        map_in_processes([functools.partial(jobs[m], retrain=True) for m in stale], args.jobs)
    return {m: job(retrain=args.retrain and not forked) for m, job in jobs.items()}


def setup_adv(args, distill_cfg, build, velocity, emd):
    """The adversarial finetune of the EMD map `emd` (AYF Sec. 3.3), trained or loaded from args.out."""
    adv_cfg = dict(distill_cfg, adv_steps=args.adv_steps, adv_lr=args.adv_lr, adv_student_lr=args.adv_student_lr,
                   adv_weight=args.adv_weight, adv_gamma=args.adv_gamma, adv_lam=args.adv_lam)

    def finetune(n, g):
        n.load_state_dict(emd.state_dict())
        with torch.random.fork_rng():                                   # D's init: the same whichever
            torch.manual_seed(args.seed)                                # models this run trained before
            D = Discriminator()
        return train_flow_map(n, velocity, args, g, "adv", "emd", adv=(D, args.adv_steps),
                              weight_state=emd.weight_state)
    return cached(args, "adv", adv_cfg, build, finetune)


def start_in_processes(fns, workers):
    """Start computing [fn() for fn in fns] in `workers` forked processes, each taking the next fn
    until none is left, while this one goes on; returns get(), which waits for that list. fns are
    inherited, not pickled. Each process sends its results, pickled, when it is done: this one runs
    no thread meanwhile, so it can fork again safely."""
    ctx = multiprocessing.get_context("fork")
    next_fn, procs = ctx.Value("i", 0), []
    for _ in range(workers):
        receive, send = ctx.Pipe(duplex=False)
        procs.append((ctx.Process(target=_work, args=(fns, next_fn, send)), receive))
        procs[-1][0].start()
        send.close()                                                    # EOFError in get() if it dies

    def get():
        done = {}
        for p, receive in procs:
            done.update(pickle.loads(receive.recv_bytes()))
            p.join()
        assert next_fn.value >= len(fns)        # (this reference keeps the counter alive: start() drops args)
        return [done[i] for i in range(len(fns))]
    return get


def map_in_processes(fns, workers):
    """[fn() for fn in fns], computed by `workers` forked processes (1: by this one)."""
    return start_in_processes(fns, workers)() if workers > 1 else [fn() for fn in fns]


def _work(fns, next_fn, send):
    done = {}
    while True:
        with next_fn.get_lock():
            i, next_fn.value = next_fn.value, next_fn.value + 1
        if i >= len(fns):
            break
        done[i] = fns[i]()
    send.send_bytes(pickle.dumps(done))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="toy_out", help="output folder: checkpoints, metrics.json, toy2d.png")
    p.add_argument("--methods", default="emd,lmd,cm,adv", help="flow maps to train: emd,lmd,cm,adv")
    p.add_argument("--steps", default="1,2,4,8,16", help="sampling step counts to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="ignore cached checkpoints")
    p.add_argument("--device", default="cpu", help="only cpu is sensible for a 2D toy; kept for symmetry")
    p.add_argument("--n-eval", type=int, default=10000, help="samples per evaluation (>= 10k for the README)")
    # Budget.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these tiny MLPs)")
    p.add_argument("--jobs", type=int, default=3, help="processes: flow maps (emd, lmd, cm) trained at once, and evaluations")
    p.add_argument("--teacher", default="exact", choices=["exact", "mlp"],
                   help="the velocity the flow maps distill: the mixture's exact one, or the MLP trained by flow matching "
                        "(the students start from that MLP either way)")
    p.add_argument("--guide-blur", type=float, default=2.0,
                   help="--teacher exact: the guide is the exact velocity of the mixture with components this much wider")
    p.add_argument("--teacher-batch", type=int, default=512)
    p.add_argument("--batch", type=int, default=256, help="flow-map distillation batch")
    p.add_argument("--hidden", type=int, default=128, help="MLP width of teacher and flow maps")
    p.add_argument("--depth", type=int, default=4, help="MLP hidden layers of teacher and flow maps")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--teacher-t", default="logitnormal", choices=["uniform", "logitnormal"],
                   help="teacher training times: logit-normal puts more of them near t = 0")
    p.add_argument("--teacher-P-mean", type=float, default=-1.0, help="mean of logit(t) for the teacher")
    p.add_argument("--teacher-P-std", type=float, default=1.4, help="std of logit(t) for the teacher")
    p.add_argument("--x-octaves", type=int, default=4,
                   help="Fourier features of x (8 directions x this many octaves): lets the MLP draw thin components")
    p.add_argument("--guide-steps", type=int, default=400, help="the weak guide trains this long")
    p.add_argument("--distill-steps", type=int, default=3000)
    p.add_argument("--adv-steps", type=int, default=200)
    # Method choices (measured in the README's ablation).
    p.add_argument("--ts-dist", default="uniform", choices=["uniform", "logitnormal"])
    p.add_argument("--P-mean", type=float, default=-0.8)
    p.add_argument("--P-std", type=float, default=1.0)
    p.add_argument("--ts-power", type=float, default=2.0,
                   help="(t, s) -> (t^p, s^p): p > 1 puts more pairs near t = 0, where the thin components part")
    p.add_argument("--p-diag", type=float, default=0.25, help="fraction of s = t pairs (flow matching)")
    p.add_argument("--p-zero", type=float, default=0.1, help="fraction of s = 0 pairs")
    p.add_argument("--weighting", default="adaptive", choices=["none", "adaptive"])
    p.add_argument("--warmup", type=int, default=0, help="tangent warmup iterations H (0: r = r_max from the start)")
    p.add_argument("--r-max", type=float, default=0.99)
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the evaluated flow-map weights")
    p.add_argument("--c", type=float, default=0.1, help="tangent normalization constant")
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--distill-lr", type=float, default=2e-3, help="distillation lr at step 0; it decays linearly to 0")
    p.add_argument("--cm-lr", type=float, default=2e-4, help="the consistency model's distillation lr at step 0")
    p.add_argument("--cm-warmup", type=int, default=500, help="the consistency model's tangent warmup iterations")
    p.add_argument("--cm-ts-power", type=float, default=1.0, help="the consistency model's --ts-power (README, Toy results)")
    p.add_argument("--adv-lr", type=float, default=5e-4, help="the discriminator's lr")
    p.add_argument("--adv-student-lr", type=float, default=2e-4, help="the flow map's lr in the adversarial finetune (constant)")
    p.add_argument("--adv-weight", type=float, default=0.1)
    p.add_argument("--adv-gamma", type=float, default=0.1, help="R1/R2 weight gamma")
    p.add_argument("--adv-lam", type=float, default=1.0, help="lam of the adversarial fakes (the evaluated lam)")
    p.add_argument("--lam-max", type=float, default=3.0, help="distill with lam ~ U[1, lam_max] (AYF: 3)")
    p.add_argument("--guidance", type=float, default=2.0, help="lam for the guided rows")
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("toy2d.py runs on the CPU; the 2D networks are too small for a GPU to help")
    steps_list = [int(k) for k in args.steps.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - {"emd", "lmd", "cm", "adv"}
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from emd,lmd,cm,adv")
    if "adv" in methods and "emd" not in methods:
        raise SystemExit("--methods adv finetunes the EMD map: include emd too")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give at least 1 (1 trains the flow maps one after another, in this process)")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    # The schedule (README, Runtime): the evaluation rows start, in cores - 1 forked processes beside
    # the training in this one, as soon as the models they sample are in `models`; the rest at the
    # end, in `cores` processes. --jobs 1: all at the end, in this process.
    models = {}                                                         # name -> network or velocity
    ev = Evaluation(args, methods, steps_list, models)
    cores = min(args.jobs, len(os.sched_getaffinity(0)))
    if args.teacher == "exact":                                         # known: evaluated while the MLP trains
        models.update(v_teacher=exact_teacher(), v_guide=exact_teacher(args.guide_blur))
    ev.start(cores - 1)
    size = dict(hidden=args.hidden, depth=args.depth, x_octaves=args.x_octaves)
    teacher_cfg, guide_cfg = setup_teacher(args, size, models)
    v_autoguided = functools.partial(guided_velocity, models["v_teacher"], models["v_guide"])
    distill_cfg = dict(seed=args.seed, batch=args.batch, teacher=teacher_cfg, guide=guide_cfg, **{k: getattr(args, k) for k in (
        "distill_steps", "ts_dist", "ts_power", "P_mean", "P_std", "p_diag", "p_zero", "weighting", "warmup",
        "r_max", "c", "distill_lr", "lam_max", "ema")}, lr_decay="linear", **size)
    build = functools.partial(student_from, models["teacher"], **size)
    models.update(setup_students(args, methods, distill_cfg, build, v_autoguided))
    if "adv" in methods:
        ev.start(cores - 1)                                             # beside the adversarial finetune
        models["adv"] = setup_adv(args, distill_cfg, build, v_autoguided, models["emd"])
    train_time = time.time() - start
    results, samples = ev.results(cores)
    samples.pop("MLP teacher ODE", None)

    # Report.
    data_loglik = log_likelihood(ev.data, ev.label)
    print(f"\ndata-vs-data floor: sliced W2 {ev.floor:.4f}, data log-likelihood {data_loglik:.3f}"
          f"   (n = {args.n_eval}; training {train_time:.0f}s)")
    print(f"{'model':38s} {'steps':>5s} {'sliced W2':>10s} {'err vs exact ODE':>17s} {'loglik':>8s}")
    for name, per_k in results.items():
        for k, met in per_k.items():
            print(f"{name:38s} {k:5d} {met['sw']:10.4f} {met['err']:17.4f} {met['loglik']:8.3f}")
    metrics = dict(floor_sw=ev.floor, data_loglik=data_loglik, train_seconds=train_time, total_seconds=time.time() - start,
                   results={name: {str(k): met for k, met in per_k.items()} for name, per_k in results.items()},
                   args=vars(args))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    map_in_processes([functools.partial(plot, samples, results, ev.floor, ev.data, ev.label, steps_list,
                                        os.path.join(args.out, "toy2d.png")),
                      functools.partial(plot_hero, samples, results, ev.data, ev.label,
                                        os.path.join(args.out, "toy2d_hero.png"))], cores)   # the two at once
    print(f"wrote {args.out}/metrics.json, toy2d.png and toy2d_hero.png in {time.time() - start:.0f}s")


COLORS = np.array(["tab:blue", "tab:orange"])                         # class 0, class 1


def scatter(ax, x, label, title, show=3000):
    """The first `show` points of x, colored by class, on the data's square."""
    ax.scatter(x[:show, 0], x[:show, 1], s=0.5, c=COLORS[label[:show].numpy()], rasterized=True)
    ax.set_xlim(-1.6, 1.6), ax.set_ylim(-1.6, 1.6), ax.set_xticks([]), ax.set_yticks([])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=7)


def plot(samples, results, floor, data, label, steps_list, path):
    """The full grid: a row of samples per flow map (one column per step count); a row with the
    data, the exact ODE and the teachers; a row with error and distance against the steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = [name for name in samples if len(samples[name]) > 1]              # the flow maps
    single = [name for name in samples if len(samples[name]) == 1]           # exact ODE, teachers
    cols = max(len(steps_list), len(single) + 1)
    fig = plt.figure(figsize=(1.9 * cols, 1.9 * (len(multi) + 1) + 2.2))
    grid = fig.add_gridspec(len(multi) + 2, cols, height_ratios=[1] * (len(multi) + 1) + [1.15])
    for i, name in enumerate(multi):                                    # step counts on top, names on the left
        for j, k in enumerate(steps_list):
            ax = fig.add_subplot(grid[i, j])
            scatter(ax, samples[name][k], label, f"{k} step{'s' if k > 1 else ''}" if i == 0 else "")
            if j == 0:
                ax.set_ylabel(name.replace(", autoguided", ",\nautoguided"), fontsize=7)
    scatter(fig.add_subplot(grid[len(multi), 0]), data, label, "data")
    for j, name in enumerate(single):
        (k, x), = samples[name].items()
        how = f"RK4, {k} steps" if name == "exact ODE" else f"Heun, {2 * k - 1} NFE"
        scatter(fig.add_subplot(grid[len(multi), 1 + j]), x, label, f"{name.replace('teacher ODE, ', '')}\n{how}")

    curves = grid[-1, :].subgridspec(1, 2, wspace=0.35)
    ax_err, ax_sw = fig.add_subplot(curves[0]), fig.add_subplot(curves[1])
    for name in multi:
        ks = sorted(results[name])
        ax_err.plot(ks, [results[name][k]["err"] for k in ks], "o-", label=name, ms=3)
        ax_sw.plot(ks, [results[name][k]["sw"] for k in ks], "o-", label=name, ms=3)
    (teacher,) = results["teacher ODE"].values()
    ax_sw.axhline(teacher["sw"], color="k", ls="--", lw=0.8, label="teacher ODE")
    ax_sw.axhline(floor, color="gray", ls=":", lw=0.8, label="data vs data")
    for ax, title in ((ax_err, "error vs exact ODE endpoint"), (ax_sw, "sliced W2 to the data")):
        ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_title(title, fontsize=8)
        ax.set_xticks(steps_list, [str(k) for k in steps_list])
        ax.set_xlabel("sampling steps", fontsize=7), ax.tick_params(which="both", labelsize=6)
    ax_sw.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_hero(samples, results, data, label, path):
    """The README's strip: data | teacher ODE | EMD at 1 and 4 steps | consistency at 1 and 16 steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (k,) = samples["teacher ODE"]
    panels = [("data", data, None), ("teacher ODE", samples["teacher ODE"][k], results["teacher ODE"][k])]
    for name, short, ks in (("AYF-EMD", "AYF-EMD", (1, 4)), ("consistency (EMD, s=0)", "consistency", (1, 16))):
        panels += [(f"{short}, {k} step{'s' if k > 1 else ''}", samples[name][k], results[name][k])
                   for k in ks if k in samples.get(name, {})]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.55 * len(panels), 1.8), squeeze=False)
    for ax, (title, x, met) in zip(axes[0], panels):
        scatter(ax, x, label, title + ("" if met is None else f"\nsliced W2 {met['sw']:.3f}"))
    fig.tight_layout(pad=0.4)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
