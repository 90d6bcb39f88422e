"""EDM2's magnitude-preserving U-Net for ImageNet 64x64, as flow-matching teacher and flow-map student.

The architecture is EDM2's Config G (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", arXiv 2312.02696), re-derived from the paper (Sec. 2.2-2.6, Fig. 21
and Appendix B), not from its code. Calling convention (flowmap.py):

    net(x, t, s, label=None, lam=None) -> F    x (N, 3, 64, 64); t, s, lam (N,); label (N, classes)

A teacher (cond_s=False, cond_lam=False) ignores s: net(x, t, t) is its velocity v(x, t), trained
on the target eps - x0. A student (cond_s=True, cond_lam=True) is F_theta(x_t, t, s, lam) of the
flow map f = x_t + (s - t) F (AYF Sec. 3). s and lam enter through zero-initialized branches, so a
student initialized from a teacher reproduces it bit for bit (init_student_from_teacher).

Forward-mode AD (jvp.py: dual numbers, a tangent rule per operation) goes through the whole network:
attention is explicit einsum + softmax, no in-place op touches an activation, no BatchNorm, no
checkpointing, and every operation here has a rule in jvp.RULES (tests/test_jvp.py checks). EDM2's forced weight
normalization rewrites the weights in place, so it is a separate step, normalize_weights_(), that
the training loop calls after every optimizer step (docs/method.md §11); forward only normalizes a copy.
"""
import functools
import math

import torch
import torch.nn.functional as nnf

RES_BALANCE = 0.3      # weight of the residual branch in mp_sum (EDM2 Sec. 2.6)
ATTN_BALANCE = 0.3     # weight of the attention branch in mp_sum (EDM2 Sec. 2.6)
LABEL_BALANCE = 0.5    # weight of the class embedding against the time embedding (EDM2 Sec. 2.6)
CONCAT_BALANCE = 0.5   # weight of the skip connection in mp_cat (EDM2 Sec. 2.6)
CLIP_ACT = 256         # EDM2 clips every block's output to [-256, 256] (numerics="edm2" only)

PRESETS = {            # EDM2 ImageNet-64 sizes (EDM2 Table 3; XS as the autoguidance paper's guide)
    "tiny": dict(model_channels=16,  channel_mult=(1, 2, 4),    num_blocks=1, attn_resolutions=(16,),
                 channels_per_head=32),                         # for CPU tests
    "digits": dict(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,),
                   channels_per_head=32),                       # MNIST at 32x32 on a CPU (README)
    "XS":   dict(model_channels=128, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8)),
    "S":    dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8)),
    "M":    dict(model_channels=256, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8)),
    "L":    dict(model_channels=320, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8)),
}

STUDENT_ONLY = ("emb_s.", "emb_s_gain", "emb_lam.", "emb_lam_gain")   # absent from a teacher


# ----------------------------------------------------------------------------------------------
# Magnitude-preserving building blocks (EDM2 Sec. 2.3-2.6).

def normalize(x, dim=None, eps=1e-4, edm2=False):
    """Scale x to unit root-mean-square over `dim` (default: all but dim 0): x / sqrt(mean(x^2) + eps^2).

    On a weight (C_out, C_in, k, k) this gives every output channel the norm sqrt(fan_in) (EDM2
    Sec. 2.3); over the channels of an activation it is EDM2's pixel norm (Sec. 2.5). EDM2 adds eps
    outside the root; inside, the map is smooth at 0 (safe for forward-mode AD) and idempotent up
    to O(eps^2), so forced normalization leaves normalized weights as they are. edm2=True is EDM2's
    form, x / (sqrt(mean(x^2)) + eps): a published EDM2 network needs it (the two differ by about
    eps = 1e-4 relative on unit-rms weights, ten times the tolerance of its conversion).
    """
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    if edm2:
        return x / (x.square().mean(dim, keepdim=True).sqrt() + eps)
    return x * torch.rsqrt(x.square().mean(dim, keepdim=True) + eps ** 2)


def mp_silu(x):
    """MP-SiLU (EDM2 Sec. 2.6): SiLU divided by its output rms for unit Gaussian input, 0.596."""
    return nnf.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """MP-Sum (EDM2 Sec. 2.6): lerp(a, b, t) rescaled to unit magnitude for independent unit inputs."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t=0.5):
    """MP-Cat along channels (EDM2 Sec. 2.6): a and b carry energy shares (1-t)^2 : t^2, total rms 1."""
    N_a, N_b = a.shape[1], b.shape[1]
    C = math.sqrt((N_a + N_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (C * (1 - t) / math.sqrt(N_a)), b * (C * t / math.sqrt(N_b))], dim=1)


class MPFourier(torch.nn.Module):
    """MP Fourier features (EDM2 Sec. 2.6) of a scalar in [0, 1]: sqrt(2) cos(2 pi (f u + phi)).

    Random phases phi ~ U[0, 1) give every feature unit rms. The frequencies f ~ N(0, bandwidth^2)
    (cycles per unit of u) are kept low on purpose: dF/dt carries a factor 2 pi f (docs/method.md §5).
    EDM2 embeds ln(sigma) / 4 with f ~ N(0, 1); on our path ln(sigma) = logit(t), which matches
    bandwidth = 1 at t = 1/2 and grows without bound towards t = 0 and t = 1; here it stays flat.
    """

    def __init__(self, num_channels, bandwidth=1.0, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(num_channels, generator=gen))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels, generator=gen))

    def forward(self, u):
        return math.sqrt(2) * torch.cos(torch.outer(u, self.freqs) + self.phases)   # (N, C)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (kernel=(k, k)) or linear layer (kernel=()), no bias.

    Forward uses w_hat = normalize(w) * gain / sqrt(fan_in) (EDM2 Sec. 2.3, weight normalization,
    differentiable and out of place), so a unit-rms input gives a unit-rms output. normalize_()
    is EDM2's forced weight normalization (Sec. 2.4): it rewrites w itself to norm sqrt(fan_in),
    which keeps the effective learning rate from decaying as ||w|| grows.
    """

    def __init__(self, in_channels, out_channels, kernel=(), edm2=False):
        super().__init__()
        self.edm2 = edm2                                        # EDM2's normalize (see normalize)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1.0):
        w = normalize(self.weight, edm2=self.edm2) * (gain / math.sqrt(self.weight[0].numel()))
        if w.ndim == 2:
            return x @ w.t()
        return nnf.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def normalize_(self):
        self.weight.copy_(normalize(self.weight, edm2=self.edm2))


def no_autocast(x):
    """Context in which the time-embedding math runs in the parameters' dtype (float32), not bf16."""
    return torch.autocast(x.device.type, enabled=False)


# ----------------------------------------------------------------------------------------------
# U-Net.

class Block(torch.nn.Module):
    """EDM2 encoder / decoder residual block (EDM2 Fig. 21, Config G).

    Encoder: [down] -> [1x1 conv to C_out] -> pixel norm -> x + residual -> [attention].
    Decoder: [up] -> x + residual, with a 1x1 conv on the skip path if C_in != C_out -> [attention].
    Residual: MP-SiLU, 3x3 conv, modulation by (1 + gain * linear(emb)), MP-SiLU, dropout, 3x3 conv.
    The "+" are mp_sum with weight 0.3 on the new branch; attention is cosine attention (Config C).
    edm2=True: EDM2's normalize, and the output clipped to [-CLIP_ACT, CLIP_ACT] as EDM2 does.
    """

    def __init__(self,
        in_channels,                    # C_in
        out_channels,                   # C_out
        emb_channels,                   # width of the conditioning embedding
        flavor,                         # "enc" or "dec"
        resample          = None,       # None, "down" (2x2 average) or "up" (nearest)
        attention         = False,      # self-attention after the residual
        channels_per_head = 64,         # attention head width (EDM2)
        dropout           = 0.0,        # dropout inside the residual branch
        edm2              = False,      # EDM2's numerics (UNet's numerics="edm2")
    ):
        super().__init__()
        self.flavor, self.resample, self.dropout, self.edm2 = flavor, resample, dropout, edm2
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        conv = functools.partial(MPConv, edm2=edm2)
        self.conv_res0 = conv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = conv(emb_channels, out_channels)
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))     # modulation starts at 1 (EDM2 Sec. 2.6)
        self.conv_res1 = conv(out_channels, out_channels, (3, 3))
        self.conv_skip = conv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        if self.num_heads:
            self.attn_qkv = conv(out_channels, out_channels * 3, (1, 1))
            self.attn_proj = conv(out_channels, out_channels, (1, 1))

    def forward(self, x, emb):
        if self.resample == "down":
            x = nnf.avg_pool2d(x, 2)
        if self.resample == "up":
            x = nnf.interpolate(x, scale_factor=2, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1, edm2=self.edm2)             # pixel norm (EDM2 Sec. 2.5)

        y = self.conv_res0(mp_silu(x))
        with no_autocast(emb):
            c = self.emb_linear(emb, gain=self.emb_gain) + 1    # (N, C_out), float32
        y = mp_silu(y * c[:, :, None, None])
        if self.dropout:
            y = nnf.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, RES_BALANCE)

        if self.num_heads:
            N, C, H, W = x.shape
            qkv = self.attn_qkv(x).reshape(N, self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = normalize(qkv, dim=2, edm2=self.edm2).unbind(3)   # (N, heads, C_head, HW), cosine attention
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v).reshape(N, C, H, W)
            x = mp_sum(x, self.attn_proj(y), ATTN_BALANCE)
        if self.edm2:
            x = x.clamp(-CLIP_ACT, CLIP_ACT)                    # out of place: x may carry a tangent
        return x


class UNet(torch.nn.Module):
    """Class-conditional EDM2 U-Net with linear-path preconditioning; see the module docstring.

    Preconditioning (EDM, Karras et al. 2022, Sec. 5, redone for x_t = (1 - t) x0 + t eps, with
    data of std sigma_data): Var x_t = (1 - t)^2 sigma_data^2 + t^2 =: d_t^2 and
        F = c_skip x_t + c_out F_net(c_in x_t, ...),   c_in = 1 / d_t,
        c_skip = (t - (1 - t) sigma_data^2) / d_t^2,   c_out = sigma_data / d_t,
    c_skip x_t is the best linear predictor of the target eps - x0 and c_out the std of what it
    misses, so both the input and the target of F_net have unit variance at every t.

    numerics="edm2" computes what a published EDM2 network computes (edm2.py loads those), and its
    preconditioning is this one up to the sign of F_net. EDM (Karras et al. 2022, Table 1) has
    x_sigma = x0 + sigma eps and D = c_skip^E x_sigma + c_out^E F_net(c_in^E x_sigma, ln(sigma) / 4),
    c_skip^E = sd^2 / (sigma^2 + sd^2), c_out^E = sigma sd / sqrt(sigma^2 + sd^2),
    c_in^E = 1 / sqrt(sigma^2 + sd^2) (sd = sigma_data). Our path is EDM's scaled by 1 - t:
    x_sigma = x_t / (1 - t) with sigma = t / (1 - t), so sqrt(sigma^2 + sd^2) = d_t / (1 - t), and
        c_in^E x_sigma = x_t / d_t = c_in x_t                        (the same network input),
    and since eps = (x_sigma - x0) / sigma, the velocity of the denoiser is
        v = E[eps - x0 | x_t] = (x_t - D) / t                        (edm2.velocity_from_denoiser)
          = [1 / t - sd^2 (1 - t) / (t d_t^2)] x_t - c_out^E / t F_net
          = (t - (1 - t) sd^2) / d_t^2 x_t - sd / d_t F_net   = c_skip x_t - c_out F_net.
    Everything agrees except the sign of the F_net term: EDM2's F_net predicts (x0 - c_skip^E
    x_sigma) / c_out^E, ours the opposite. The other edm2 numerics: the time input ln(sigma) / 4 =
    logit(t) / 4 (EDM2's c_noise) instead of t, eps outside the root in normalize, and every block's
    output clipped to [-256, 256]. s and lam keep the plain input: ln(s / (1 - s)) is -inf at s = 0,
    the flow map's one-jump target, and its derivative, which LMD's dF/ds needs, blows up there.

    dropout must be 0 for distillation: the finite-difference JVP (--jvp fd) would draw other masks
    than the trainable forward, so its tangent would not belong to the function being trained.
    """

    def __init__(self,
        img_resolution    = 64,             # input / output resolution
        img_channels      = 3,              # input / output channels
        num_classes       = 1000,           # length of the one-hot label
        model_channels    = 192,            # channels at the top level (EDM2-S)
        channel_mult      = (1, 2, 3, 4),   # channels per level, times model_channels
        channel_mult_emb  = 4,              # embedding width, times model_channels (EDM2)
        num_blocks        = 3,              # blocks per level in the encoder (+1 in the decoder)
        attn_resolutions  = (16, 8),        # resolutions with self-attention
        channels_per_head = 64,             # attention head width
        dropout           = 0.0,            # residual-branch dropout; 0 for distillation (see above)
        sigma_data        = 0.5,            # data std assumed by the preconditioning
        time_bandwidth    = 1.0,            # std of the Fourier frequencies of t, s, lam (MPFourier)
        cond_s            = False,          # embed the target time s (student)
        cond_lam          = False,          # embed the guidance strength lam (student)
        numerics          = "ayf",          # "ayf" (ours) or "edm2" (EDM2's, for its networks; see above)
    ):
        super().__init__()
        if numerics not in ("ayf", "edm2"):
            raise ValueError(f"numerics={numerics!r}: use 'ayf' or 'edm2'")
        self.num_classes, self.sigma_data = num_classes, sigma_data
        self.cond_s, self.cond_lam, self.edm2 = cond_s, cond_lam, numerics == "edm2"
        C_emb = model_channels * channel_mult_emb
        block = dict(emb_channels=C_emb, channels_per_head=channels_per_head, dropout=dropout, edm2=self.edm2)
        conv = functools.partial(MPConv, edm2=self.edm2)

        # Embedding (EDM2 Sec. 2.2, 2.6): Fourier(t) -> linear, MP-summed with linear(label); s and
        # lam are added with gains that start at 0, so the student starts as the teacher (docs/method.md §5).
        self.emb_fourier = MPFourier(model_channels, time_bandwidth)
        self.emb_t = conv(model_channels, C_emb)
        self.emb_label = conv(num_classes, C_emb)
        if cond_s:
            self.emb_s = conv(model_channels, C_emb)
            self.emb_s_gain = torch.nn.Parameter(torch.zeros([]))
        if cond_lam:
            self.emb_lam = conv(model_channels, C_emb)
            self.emb_lam_gain = torch.nn.Parameter(torch.zeros([]))

        # Encoder: a 3x3 conv, then per level [down block] + num_blocks blocks; every output is a skip.
        self.conv_in = conv(img_channels + 1, model_channels * channel_mult[0], (3, 3))
        self.enc = torch.nn.ModuleList()
        skips = [model_channels * channel_mult[0]]
        C = skips[0]
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(Block(C, C, flavor="enc", resample="down", **block))
                skips.append(C)
            for _ in range(num_blocks):
                attn = res in attn_resolutions
                self.enc.append(Block(C, model_channels * mult, flavor="enc", attention=attn, **block))
                C = model_channels * mult
                skips.append(C)

        # Decoder: two blocks at the bottom (the first with attention), then per level [up block] +
        # num_blocks + 1 blocks that each take one skip through mp_cat.
        self.dec = torch.nn.ModuleList()
        self.dec_takes_skip = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec.append(Block(C, C, flavor="dec", attention=True, **block))
                self.dec.append(Block(C, C, flavor="dec", **block))
                self.dec_takes_skip += [False, False]
            else:
                self.dec.append(Block(C, C, flavor="dec", resample="up", **block))
                self.dec_takes_skip.append(False)
            for _ in range(num_blocks + 1):
                attn = res in attn_resolutions
                C_in = C + skips.pop()
                self.dec.append(Block(C_in, model_channels * mult, flavor="dec", attention=attn, **block))
                self.dec_takes_skip.append(True)
                C = model_channels * mult
        self.conv_out = conv(C, img_channels, (3, 3))
        self.out_gain = torch.nn.Parameter(torch.ones([]))      # EDM2 starts at 0; 1 gives Var F ~ 1
        self.normalize_weights_()

    def normalize_weights_(self):
        """EDM2 forced weight normalization (Sec. 2.4): call at init and after every optimizer step."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.normalize_()

    def precond(self, t):
        """(c_in, c_skip, c_out), each (N, 1, 1, 1), for the linear path (class docstring)."""
        t = t.reshape(-1, 1, 1, 1)
        d_t = ((1 - t) ** 2 * self.sigma_data ** 2 + t ** 2).sqrt()
        return 1 / d_t, (t - (1 - t) * self.sigma_data ** 2) / d_t ** 2, self.sigma_data / d_t

    def time_input(self, t):
        """What the Fourier features of t see: t itself, or EDM2's c_noise = ln(sigma) / 4 with
        sigma = t / (1 - t) (numerics="edm2"; finite for 0 < t < 1)."""
        return (torch.log(t) - torch.log1p(-t)) / 4 if self.edm2 else t

    def embed(self, t, s, label, lam):
        """The conditioning vector (N, C_emb) from t, s, label, lam, in the parameters' dtype."""
        dtype = self.emb_t.weight.dtype
        if lam is not None and not self.cond_lam:
            raise ValueError("this network was built with cond_lam=False; apply guidance outside it")
        if label is None:
            label = torch.zeros(len(t), self.num_classes, device=t.device)    # unconditional
        emb = self.emb_t(self.emb_fourier(self.time_input(t.to(dtype))))
        emb = mp_sum(emb, self.emb_label(label.to(dtype) * math.sqrt(self.num_classes)), LABEL_BALANCE)
        # Plain sums, not mp_sum: at gain 0 the added term is exactly 0 and emb + 0 is emb bit for
        # bit, whereas mp_sum would rescale emb. The learned gains then set the new terms' magnitude.
        if self.cond_s:
            emb = emb + self.emb_s_gain * self.emb_s(self.emb_fourier(s.to(dtype)))
        if self.cond_lam:
            lam = torch.ones_like(t) if lam is None else lam                  # lam = 1: no guidance
            emb = emb + self.emb_lam_gain * self.emb_lam(self.emb_fourier((lam.to(dtype) - 1) / 2))
        return mp_silu(emb)

    def encode(self, x, emb):
        """Encoder activations (the skips), highest resolution first; x is already scaled by c_in."""
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)   # a constant channel, no biases (EDM2 Sec. 2.2)
        x = x.contiguous(memory_format=torch.channels_last)    # every conv after it runs channels-last: 20% faster
        skips = [self.conv_in(x)]
        for block in self.enc:
            skips.append(block(skips[-1], emb))
        return skips

    def forward(self, x, t, s, label=None, lam=None):
        """F(x_t, t, s) shaped like x. t, s, lam: (N,); label: (N, num_classes) one-hot or None."""
        with no_autocast(x):
            c_in, c_skip, c_out = self.precond(t.to(self.emb_t.weight.dtype))
            emb = self.embed(t, s, label, lam)                 # (N, C_emb)
        skips = self.encode(c_in * x, emb)
        y = skips[-1]
        for block, takes_skip in zip(self.dec, self.dec_takes_skip):
            y = block(mp_cat(y, skips.pop(), CONCAT_BALANCE) if takes_skip else y, emb)
        y = self.conv_out(y, gain=self.out_gain)               # (N, 3, H, W)
        if self.edm2:
            return c_skip * x - c_out * y                      # EDM2's sign of F_net (class docstring)
        return c_skip * x + c_out * y

    def features(self, x, t, label=None):
        """The last encoder activation at s = t, for a discriminator head: (N, 4 C, 8, 8) for the
        64x64 presets. Use it on a frozen copy of the teacher."""
        with no_autocast(x):
            c_in = self.precond(t.to(self.emb_t.weight.dtype))[0]
            emb = self.embed(t, t, label, None)
        return self.encode(c_in * x, emb)[-1]


def init_student_from_teacher(student, teacher_state_dict):
    """Load a teacher's weights into a student of the same preset (AYF / sCM initialization).

    Every teacher tensor must exist in the student with the same shape; only the student's s and lam
    branches may be missing, and they keep their zero gains, so the student equals the teacher.
    """
    own = student.state_dict()
    missing = [k for k in own if k not in teacher_state_dict and not k.startswith(STUDENT_ONLY)]
    unexpected = [k for k in teacher_state_dict if k not in own]
    mismatched = [f"{k}: teacher {tuple(v.shape)} vs student {tuple(own[k].shape)}"
                  for k, v in teacher_state_dict.items() if k in own and v.shape != own[k].shape]
    problems = {"missing from teacher": missing, "not in student": unexpected, "shape mismatch": mismatched}
    if any(problems.values()):
        details = "".join(f"\n  {what} ({len(keys)}): {keys[:3]}" for what, keys in problems.items() if keys)
        raise ValueError(f"teacher state dict does not fit this student (preset? num_classes?){details}")
    student.load_state_dict(teacher_state_dict, strict=False)
    return student


def num_params(net):
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters())


if __name__ == "__main__":
    for name, preset in PRESETS.items():
        print(f"{name:5s} {num_params(UNet(**preset)) / 1e6:8.2f} M parameters")
