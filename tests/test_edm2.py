"""edm2.py: EDM2 network pickles, built here in EDM2's file format (no EDM2 code), loaded and checked
against a separate functional implementation of EDM2's denoiser written from its paper's layout."""
import collections
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

import edm2
import unet
from flowmap import sample_flow_map, sample_ode, time_grid
from gaussian_oracle import GaussianFlowMap, gaussian_velocity
from losses import sample_t_s

ARCH = dict(model_channels=16, channel_mult=[1, 2, 4], num_blocks=1, attn_resolutions=[16], channels_per_head=32)
CLASSES, N = 10, 2


# ----------------------------------------------------------------------------------------------
# Writing an EDM2 pickle. EDM2's persistence pickles an object of its classes as a call of
# torch_utils.persistence._reconstruct_persistent_obj(meta); the module and the EasyDict class are
# stood in for here, only while the file is written.

@pytest.fixture
def edm2_names(monkeypatch):
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only pickled here, never called")
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = type("EasyDict", (dict,), {"__module__": util.__name__})
    for name, module in [("torch_utils", types.ModuleType("torch_utils")), ("torch_utils.persistence", persistence),
                         ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", util)]:
        monkeypatch.setitem(sys.modules, name, module)
    return persistence, util


class Persistent:
    """An object of an EDM2 class as EDM2's persistence pickles it."""

    def __init__(self, hook, class_name, params=(), buffers=(), modules=(), **attrs):
        self.hook = hook
        self.meta = dict(type="class", version=6, module_src="# the class's module source, never run",
                         class_name=class_name,
                         state=dict(training=False, _parameters=collections.OrderedDict(params),
                                    _buffers=collections.OrderedDict(buffers), _non_persistent_buffers_set=set(),
                                    _modules=collections.OrderedDict(modules), **attrs))

    def __reduce__(self):
        return self.hook, (self.meta,)


def module_dict(children):
    md = torch.nn.ModuleDict()
    md._modules = collections.OrderedDict(children)         # Persistent children, as EDM2's ModuleDicts hold
    return md


def build_edm2(hook, gen, label_dim=CLASSES, img_channels=3, resolution=64, arch=ARCH):
    """An EDM2 Precond object tree with random weights, in EDM2's layout; returns (tree, {name: tensor})."""
    W = collections.OrderedDict()

    def param(name, *shape):
        W[name] = (torch.randn(*shape, generator=gen) if shape else 0.5 + torch.rand([], generator=gen))
        return name.rpartition(".")[2], torch.nn.Parameter(W[name].half(), requires_grad=False)   # EDM2 saves fp16

    def conv(name, c_out, c_in, *kernel):
        return Persistent(hook, "MPConv", [param(f"{name}.weight", c_out, c_in, *kernel)], out_channels=c_out)

    def block(name, c_in, c_out, flavor, attention):
        heads = c_out // arch["channels_per_head"] if attention else 0
        mods = [("conv_res0", conv(f"{name}.conv_res0", c_out, c_out if flavor == "enc" else c_in, 3, 3)),
                ("emb_linear", conv(f"{name}.emb_linear", c_out, C_emb)),
                ("conv_res1", conv(f"{name}.conv_res1", c_out, c_out, 3, 3))]
        mods += [("conv_skip", conv(f"{name}.conv_skip", c_out, c_in, 1, 1))] if c_in != c_out else []
        mods += [("attn_qkv", conv(f"{name}.attn_qkv", 3 * c_out, c_out, 1, 1)),
                 ("attn_proj", conv(f"{name}.attn_proj", c_out, c_out, 1, 1))] if heads else []
        return Persistent(hook, "Block", [param(f"{name}.emb_gain")], modules=mods, out_channels=c_out,
                          flavor=flavor, num_heads=heads)

    mc, mult, nb = arch["model_channels"], arch["channel_mult"], arch["num_blocks"]
    C_emb = mc * max(mult)
    enc, skips, c = [], [], img_channels + 1
    for level, m in enumerate(mult):                        # EDM2 Fig. 21: names by resolution
        r = resolution >> level
        if level == 0:
            enc.append((f"{r}x{r}_conv", conv(f"unet.enc.{r}x{r}_conv", mc * m, c, 3, 3)))
            c = mc * m
        else:                                               # keeps the channels; the next block changes them
            enc.append((f"{r}x{r}_down", block(f"unet.enc.{r}x{r}_down", c, c, "enc", False)))
        skips.append(c)
        for i in range(nb):
            enc.append((f"{r}x{r}_block{i}", block(f"unet.enc.{r}x{r}_block{i}", c, mc * m, "enc",
                                                   r in arch["attn_resolutions"])))
            c = mc * m
            skips.append(c)
    dec = []
    for level, m in reversed(list(enumerate(mult))):
        r = resolution >> level
        if level == len(mult) - 1:
            dec += [(f"{r}x{r}_in0", block(f"unet.dec.{r}x{r}_in0", c, c, "dec", True)),
                    (f"{r}x{r}_in1", block(f"unet.dec.{r}x{r}_in1", c, c, "dec", False))]
        else:
            dec.append((f"{r}x{r}_up", block(f"unet.dec.{r}x{r}_up", c, c, "dec", False)))
        for i in range(nb + 1):
            c_in = c + skips.pop()
            dec.append((f"{r}x{r}_block{i}", block(f"unet.dec.{r}x{r}_block{i}", c_in, mc * m, "dec",
                                                   r in arch["attn_resolutions"])))
            c = mc * m

    def fourier(name, n):
        W[f"{name}.freqs"] = 2 * math.pi * torch.randn(n, generator=gen)
        W[f"{name}.phases"] = 2 * math.pi * torch.rand(n, generator=gen)
        return Persistent(hook, "MPFourier", buffers=[(k, W[f"{name}.{k}"].half()) for k in ("freqs", "phases")])

    net = Persistent(hook, "UNet", [param("unet.out_gain")], modules=[
        ("emb_fourier", fourier("unet.emb_fourier", mc)),
        ("emb_noise", conv("unet.emb_noise", C_emb, mc)),
        ("emb_label", conv("unet.emb_label", C_emb, label_dim) if label_dim else None),
        ("enc", module_dict(enc)), ("dec", module_dict(dec)),
        ("out_conv", conv("unet.out_conv", img_channels, c, 3, 3))],
        _init_kwargs=dict(img_resolution=resolution, img_channels=img_channels, label_dim=label_dim,
                          dropout=0.0, **arch), label_balance=0.5, concat_balance=0.5)
    precond = Persistent(hook, "Precond", modules=[("unet", net), ("logvar_fourier", fourier("logvar_fourier", 128)),
                                                   ("logvar_linear", conv("logvar_linear", 1, 128))],
                         img_resolution=resolution, img_channels=img_channels, label_dim=label_dim,
                         use_fp16=True, sigma_data=0.5, logvar_channels=128)
    return precond, {k: v.half().float() for k, v in W.items()}


def write_edm2(path, edm2_names, gen, encoder="StandardRGBEncoder", **kwargs):
    persistence, util = edm2_names
    hook = persistence._reconstruct_persistent_obj
    precond, W = build_edm2(hook, gen, **kwargs)
    data = util.EasyDict(encoder=Persistent(hook, encoder), dataset_kwargs=util.EasyDict(class_name="x"),
                         loss_fn=Persistent(hook, "EDM2Loss", P_mean=-0.8, P_std=1.6, sigma_data=0.5), ema=precond)
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return W


# ----------------------------------------------------------------------------------------------
# EDM2's denoiser as a function of its named tensors (EDM2 paper, Fig. 21 and Eqs. of Sec. 2),
# written apart from unet.py: it walks EDM2's module names in EDM2's order.

def edm2_denoiser(W, x, sigma, label, arch=ARCH, sd=0.5, eps=1e-4):
    rms = lambda x, dims: torch.linalg.vector_norm(x, dim=dims, keepdim=True) / math.sqrt(   # noqa: E731
        math.prod(x.shape[d] for d in dims))
    mp_silu = lambda x: nnf.silu(x) / 0.596                                                  # noqa: E731

    def conv(name, x, gain=1.0):
        w = W[name + ".weight"]
        dims = tuple(range(1, w.ndim))
        w = w / (rms(w, dims) + eps) * (gain / math.sqrt(w[0].numel()))
        return x @ w.T if w.ndim == 2 else nnf.conv2d(x, w, padding=w.shape[-1] // 2)

    def block(name, x, emb, enc):
        if name.endswith("_down"):
            n, c, h, w = x.shape
            x = x.reshape(n, c, h // 2, 2, w // 2, 2).mean((3, 5))
        if name.endswith("_up"):
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        if enc and name + ".conv_skip.weight" in W:
            x = conv(name + ".conv_skip", x)
        if enc:
            x = x / (rms(x, (1,)) + eps)
        y = conv(name + ".conv_res0", mp_silu(x))
        y = mp_silu(y * (conv(name + ".emb_linear", emb, W[name + ".emb_gain"]) + 1)[:, :, None, None])
        y = conv(name + ".conv_res1", y)
        if not enc and name + ".conv_skip.weight" in W:
            x = conv(name + ".conv_skip", x)
        x = (0.7 * x + 0.3 * y) / math.sqrt(0.7 ** 2 + 0.3 ** 2)
        if name + ".attn_qkv.weight" in W:
            n, c, h, w = x.shape
            qkv = conv(name + ".attn_qkv", x).reshape(n, c // arch["channels_per_head"], -1, 3, h * w)
            q, k, v = (qkv / (rms(qkv, (2,)) + eps)).unbind(3)
            a = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(q.shape[2]), dim=3)
            y = conv(name + ".attn_proj", torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, c, h, w))
            x = (0.7 * x + 0.3 * y) / math.sqrt(0.7 ** 2 + 0.3 ** 2)
        return x.clamp(-256, 256)

    sigma = sigma.reshape(-1, 1, 1, 1)
    c_in, c_skip = 1 / (sd ** 2 + sigma ** 2).sqrt(), sd ** 2 / (sd ** 2 + sigma ** 2)
    c_out = sigma * sd / (sd ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.flatten().log() / 4
    features = math.sqrt(2) * torch.cos(c_noise[:, None] * W["unet.emb_fourier.freqs"] + W["unet.emb_fourier.phases"])
    emb = conv("unet.emb_noise", features)
    emb = (emb + conv("unet.emb_label", label * math.sqrt(label.shape[1]))) / math.sqrt(2)    # mp_sum, t = 1/2
    emb = mp_silu(emb)
    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for name in dict.fromkeys(k.split(".")[2] for k in W if k.startswith("unet.enc.")):   # EDM2's order
        h = conv(f"unet.enc.{name}", h) if name.endswith("_conv") else block(f"unet.enc.{name}", h, emb, True)
        skips.append(h)
    for name in dict.fromkeys(k.split(".")[2] for k in W if k.startswith("unet.dec.")):
        if "_block" in name:                                    # mp_cat, t = 1/2: equal energy shares
            s = skips.pop()
            Na, Nb = h.shape[1], s.shape[1]
            h = torch.cat([h * math.sqrt((Na + Nb) / 2 / Na), s * math.sqrt((Na + Nb) / 2 / Nb)], dim=1)
        h = block(f"unet.dec.{name}", h, emb, False)
    F_x = conv("unet.out_conv", h, W["unet.out_gain"])
    return c_skip * x + c_out * F_x


def inputs(gen, dtype=torch.float32):
    x0, eps = 0.5 * torch.randn(N, 3, 64, 64, generator=gen), torch.randn(N, 3, 64, 64, generator=gen)
    label = nnf.one_hot(torch.randint(CLASSES, (N,), generator=gen), CLASSES).float()
    return x0.to(dtype), eps.to(dtype), label.to(dtype)


# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def test_loaded_pickle_is_edm2s_denoiser_as_a_velocity(tmp_path, edm2_names):
    gen = torch.Generator().manual_seed(0)
    W = write_edm2(tmp_path / "net.pkl", edm2_names, gen)
    net, config = edm2.load(tmp_path / "net.pkl")
    assert config["preset"] == "tiny" and config["numerics"] == "edm2" and config["num_classes"] == CLASSES
    assert config["t_min"] == pytest.approx(0.002 / 1.002) and config["t_max"] == pytest.approx(80 / 81)
    x0, eps, label = inputs(gen)
    worst = 0.0
    for t_value in (0.01, 0.1, 0.5, 0.9, 0.95):                 # the target range, float32
        t = torch.full((N,), t_value)
        x_t = (1 - t_value) * x0 + t_value * eps
        v_ref = edm2.velocity_from_denoiser(lambda x, sigma: edm2_denoiser(W, x, sigma, label), x_t, t)
        v = net(x_t, t, t, label=label)
        worst = max(worst, ((v - v_ref).abs().max() / v_ref.abs().max()).item())
    assert worst < 1e-5, worst
    # float64: the same function, not just close (tensor order and key map exact)
    W64, net64 = {k: v.double() for k, v in W.items()}, net.double()
    x0, eps, label = (a.double() for a in (x0, eps, label))
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    v_ref = edm2.velocity_from_denoiser(lambda x, sigma: edm2_denoiser(W64, x, sigma, label), x_t, t)
    assert ((net64(x_t, t, t, label=label) - v_ref).norm() / v_ref.norm()).item() < 1e-12


def test_refuses_code_in_the_pickle(tmp_path):
    marker = tmp_path / "ran"
    calls = {"os.system": (os.system, (f"touch {marker}",)), "builtins.eval": (eval, (f"open('{marker}', 'w')",))}
    for name, call in calls.items():
        payload = dict(ema=type("Payload", (), {"__reduce__": lambda self, call=call: call})())
        (tmp_path / "evil.pkl").write_bytes(pickle.dumps(payload))
        with pytest.raises(pickle.UnpicklingError, match=f"refused to load .*{name.split('.')[1]}"):
            edm2.load(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("kind, kwargs, message", [
    ("latent", dict(img_channels=4, encoder="StabilityVAEEncoder"), "latent-space .* VAE"),
    ("unconditional", dict(label_dim=0), "unconditional"),
    ("resolution", dict(resolution=32), "resolution 32"),
    ("sizes", dict(arch={**ARCH, "model_channels": 24}), "matches no preset"),
])
def test_unsupported_models_are_clear_errors(tmp_path, edm2_names, kind, kwargs, message):
    write_edm2(tmp_path / f"{kind}.pkl", edm2_names, torch.Generator().manual_seed(1), **kwargs)
    with pytest.raises(ValueError, match=message):
        edm2.load(tmp_path / f"{kind}.pkl")


def test_denoiser_of_gaussian_data_converts_to_the_exact_velocity():
    """The exact EDM denoiser of x0 ~ N(mu, c^2 I), D(x, sigma) = mu + c^2 / (c^2 + sigma^2) (x - mu),
    through v = (x_t - D(x_t / (1 - t), sigma)) / t, is the exact linear-path velocity."""
    gen = torch.Generator().manual_seed(2)
    mu, c = torch.randn(3, generator=gen, dtype=torch.float64), 0.7
    t = torch.tensor([edm2.T_MIN, 0.01, 0.3, 0.5, 0.9, edm2.T_MAX], dtype=torch.float64)
    x_t = torch.randn(len(t), 3, generator=gen, dtype=torch.float64)
    D = lambda x, sigma: mu + (c ** 2 / (c ** 2 + sigma ** 2))[:, None] * (x - mu)          # noqa: E731
    v = edm2.velocity_from_denoiser(D, x_t, t)
    assert torch.allclose(v, gaussian_velocity(x_t, t, mu, c), rtol=1e-10, atol=1e-10)
    assert torch.allclose(edm2.t_of(edm2.sigma_of(t)), t, rtol=1e-14)
    assert edm2.sigma_of(torch.tensor(edm2.T_MAX)) == pytest.approx(80.0)


@torch.no_grad()
def test_edm_preconditioning_is_ours_up_to_the_output_sign():
    """For any F_net: EDM's D with c_noise = ln(sigma) / 4, as a velocity, is c_skip x - c_out F_net
    with our linear-path coefficients (unet.UNet docstring)."""
    gen = torch.Generator().manual_seed(3)
    net = unet.UNet(num_classes=CLASSES, **unet.PRESETS["tiny"]).double()
    a = torch.randn(4, dtype=torch.float64, generator=gen)
    F_net = lambda x_in, u: torch.tanh(a[:, None] * x_in + u[:, None])                        # noqa: E731
    sd = net.sigma_data
    t = torch.tensor([0.01, 0.2, 0.5, 0.95], dtype=torch.float64)
    x_t = torch.randn(4, 5, generator=gen, dtype=torch.float64)

    def D(x, sigma):
        s = sigma[:, None]
        return sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F_net(
            x / (s ** 2 + sd ** 2).sqrt(), sigma.log() / 4)
    c_in, c_skip, c_out = (c.reshape(-1, 1) for c in net.precond(t))
    ours = c_skip * x_t - c_out * F_net(c_in * x_t, torch.logit(t) / 4)
    assert torch.allclose(edm2.velocity_from_denoiser(D, x_t, t), ours, rtol=1e-12, atol=1e-12)
    edm2_net = unet.UNet(num_classes=CLASSES, **unet.PRESETS["tiny"], numerics="edm2").double()
    assert torch.allclose(edm2_net.time_input(t), edm2.sigma_of(t).log() / 4, rtol=1e-12)


@torch.no_grad()
def test_student_from_edm2_teacher_is_the_teacher_and_takes_s_0(tmp_path, edm2_names):
    write_edm2(tmp_path / "net.pkl", edm2_names, torch.Generator().manual_seed(4))
    teacher, config = edm2.load(tmp_path / "net.pkl")
    student = unet.UNet(num_classes=CLASSES, **unet.PRESETS["tiny"], numerics="edm2", cond_s=True, cond_lam=True)
    unet.init_student_from_teacher(student, teacher.state_dict())
    gen = torch.Generator().manual_seed(5)
    x0, eps, label = inputs(gen)
    t = torch.tensor([config["t_max"], 0.3])
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    v = teacher(x_t, t, t, label=label)
    for s in (torch.zeros(N), 0.5 * t, t):                       # s = 0: the one-jump target
        assert torch.equal(student(x_t, t, s, label=label, lam=1 + t), v)
    student.emb_s_gain.fill_(1.0)                                # live s branch: still finite at s = 0
    F0 = student(x_t, t, torch.zeros(N), label=label)
    assert torch.isfinite(F0).all() and not torch.equal(F0, v)


# ----------------------------------------------------------------------------------------------
# EDM2's time range, t in [T_MIN, T_MAX] (sigma in [0.002, 80]): where sampling starts and ends.

def test_sampling_from_t_max_and_the_jump_to_0_on_gaussian_data():
    """x = t_max z is EDM's start sigma_max z; through the exact flow map of N(mu, c^2) data it ends
    at mu + (c / sd_T)(t_max z - (1 - t_max) mu): std off by (c / sigma_max)^2 / 2, mean shrunk by
    c (1 - t_max) / sd_T (flowmap.time_grid)."""
    gen = torch.Generator().manual_seed(6)
    mu, c, T = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64), 0.5, edm2.T_MAX
    exact = GaussianFlowMap(mu, torch.tensor(c, dtype=torch.float64).log())
    z = torch.randn(1000, 3, generator=gen, dtype=torch.float64)
    grid = time_grid(4, dtype=torch.float64, t_max=T)
    assert grid[0] == T and grid[-1] == 0
    with torch.no_grad():
        x0 = sample_flow_map(exact, T * z, 4, grid)              # four exact jumps, the last one to s = 0
    sd_T = math.sqrt((1 - T) ** 2 * c ** 2 + T ** 2)
    assert torch.allclose(x0, mu + c / sd_T * (T * z - (1 - T) * mu), rtol=1e-10, atol=1e-12)
    assert 1 - T / sd_T == pytest.approx((c / edm2.SIGMA_MAX) ** 2 / 2, rel=1e-3)   # 2e-5
    assert c * (1 - T) / sd_T == pytest.approx(c / 80, rel=1e-4)


def test_ode_sampler_stays_in_range_and_its_last_step_is_the_denoiser():
    gen = torch.Generator().manual_seed(7)
    mu, c = torch.randn(3, generator=gen, dtype=torch.float64), 0.5
    D = lambda x, sigma: mu + (c ** 2 / (c ** 2 + sigma ** 2))[:, None] * (x - mu)          # noqa: E731
    asked = []

    def velocity(x, t):
        asked.append(t)
        return edm2.velocity_from_denoiser(D, x, t)
    z = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    sample_ode(velocity, edm2.T_MAX * z, 32, "heun", time_grid(32, dtype=torch.float64, t_max=edm2.T_MAX))
    assert edm2.T_MIN <= torch.cat(asked).min() and torch.cat(asked).max() <= edm2.T_MAX
    t = torch.full((8,), 0.03, dtype=torch.float64)              # the last Euler step, t -> 0
    x_t = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    last = sample_ode(velocity, x_t, 1, "euler", torch.tensor([0.03, 0.0], dtype=torch.float64))
    assert torch.allclose(last, D(x_t / (1 - t[:, None]), edm2.sigma_of(t)), rtol=1e-12, atol=1e-12)


def test_t_s_pairs_stay_in_edm2s_range():
    t, s = sample_t_s(4096, p_zero=0.1, generator=torch.Generator().manual_seed(8), t_min=edm2.T_MIN, t_max=edm2.T_MAX)
    zero = s == 0
    assert 0.07 < zero.float().mean() < 0.13
    assert (t >= edm2.T_MIN).all() and (t <= edm2.T_MAX).all() and (s <= t).all()
    assert (s[~zero] >= edm2.T_MIN).all()
    assert t.max() > 0.97 and s[~zero].min() < 0.01               # the whole range is used


def test_read_config_without_tensors_agrees_with_load(tmp_path, edm2_names):
    write_edm2(tmp_path / "net.pkl", edm2_names, torch.Generator().manual_seed(9))
    assert edm2.read_config(tmp_path / "net.pkl") == edm2.load(tmp_path / "net.pkl")[1]


# ----------------------------------------------------------------------------------------------
# The command lines: train_imagenet.py and sample.py take EDM2 pickles as teacher, guide and --ckpt.

def test_distill_and_sample_from_edm2_pickles(tmp_path, edm2_names):
    import sample
    import train_imagenet as ti
    teacher, guide = tmp_path / "teacher.pkl", tmp_path / "guide.pkl"
    write_edm2(teacher, edm2_names, torch.Generator().manual_seed(10))
    write_edm2(guide, edm2_names, torch.Generator().manual_seed(11))
    assert ti.read_config(teacher) == edm2.read_config(teacher)
    net, config = ti.load_snapshot(teacher)
    assert config["numerics"] == "edm2" and net.edm2
    base = ["--data", "synthetic", "--device", "cpu", "--batch", "4", "--status-kimg", "1", "--snapshot-kimg", "1"]
    ti.main(base + ["--stage", "distill", "--teacher", str(teacher), "--guide", str(guide), "--kimg", "0.004",
                    "--p-zero", "0.5", "--out", str(tmp_path / "ayf")])
    student, student_cfg = ti.load_snapshot(tmp_path / "ayf")
    assert student.edm2 and (student_cfg["t_min"], student_cfg["t_max"]) == (edm2.T_MIN, edm2.T_MAX)
    sample.main(["--ckpt", str(tmp_path / "ayf"), "--steps", "1", "--guidance", "1.7", "--seeds", "0-1",
                 "--out", str(tmp_path / "ayf.npz"), "--device", "cpu"])
    sample.main(["--ckpt", str(teacher), "--guide", str(guide), "--guidance", "1.7", "--steps", "2",
                 "--seeds", "0-1", "--out", str(tmp_path / "teacher.npz"), "--device", "cpu"])
    for name in ("ayf.npz", "teacher.npz"):
        with np.load(tmp_path / name) as data:
            assert data["arr_0"].shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="p-zero"):             # LMD would ask the teacher at s = 0
        ti.parse_config(base + ["--stage", "distill", "--loss", "lmd", "--teacher", str(teacher), "--guide",
                                str(guide), "--p-zero", "0.1"])
