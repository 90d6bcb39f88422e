"""Adversarial finetuning of a distilled flow map (train_imagenet.py --stage adv): the discriminator D
(the frozen teacher's encoder + a small trainable head), the student's few-step fakes, and the two
objectives, the generator's RpGAN term and the discriminator's RpGAN + gamma/2 (R1 + R2)."""
import functools

import torch

import unet
from flowmap import bcast, flow_map
from losses import grad_penalty, rpgan_d_loss, rpgan_g_loss

ADV_BETAS = (0.0, 0.99)         # the discriminator head's Adam (R3GAN)

# Adversarial finetuning (AYF Sec. 3.3; docs/method.md §7). Our choices, which the paper leaves open:
#   fakes         one per row of the global batch, from its own noise z, at the row's label and at
#                 lam = --adv-lam: a 1-step sample f(z, 1, 0) or a 2-step one (1 -> 0.5 -> 0), half and
#                 half; each is paired with the row's real image, which has the same label (relativistic
#                 pairs). Why one lam: D compares fakes with real, unguided data, so at any lam it pulls
#                 the fakes toward the unguided distribution; giving D lam would not change that (its
#                 reals would still be unguided). So the GAN finetunes the one lam users sample with,
#                 where matching the data is the goal (FID is measured there), and the distillation term,
#                 at lam ~ U, keeps the other lam on the guided teacher.
#   D             the frozen teacher (EMA) encoder, UNet.features, at a noise level t_D ~ U[t_min, adv_t_max]
#                 shared by the real and the fake of a pair (same t_D, same noise), then DiscriminatorHead.
#   R1 / R2       taken w.r.t. the clean image x, through the noising and the frozen encoder: D is a
#                 function of the image and the noise is part of D (grad_x = (1 - t_D) grad_{x_tD}).
#   order         one generator step and one D step per iteration, simultaneous: both use the same
#                 fakes (made before either update) and the current D, so the D step needs no
#                 generator forward of its own (as toy2d.py). A skipped step skips both.
#   optimizers    the generator's Adam at --init's last learning rate, constant; the head's Adam with
#                 betas (0, 0.99) (R3GAN) at --adv-lr. No EMA of the head.
#   weights       --adv-weight 0.01: at weight 1 the adversarial gradient on the generator measured 30-200x
#                 the EMD one (tiny preset, 16-64 px; EMD's loss is a per-pixel mean of a normalized
#                 tangent), so 0.01 puts them within a small factor. --adv-gamma 0.1 as toy2d.py;
#                 --adv-t-max 0.8: at t_D = 0.8 the signal is already 1/8 of the noise (data std 0.5).
#                 None of the three is tuned on images.


class DiscriminatorHead(torch.nn.Module):
    """The small trainable adversarial head on the frozen teacher's lowest-resolution encoder features:
    1x1 conv -> pixel norm -> MP-SiLU -> global average pool -> linear score, plus a projection of the
    pooled features on an embedding of the label (projection discriminator, Miyato & Koyama 2018),
    which makes the score class-conditional."""

    def __init__(self,
        in_channels,                    # channels of UNet.features (4 model_channels for the 64x64 presets)
        num_classes,                    # length of the one-hot label
        channels = 256,                 # width of the head
    ):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, channels, 1)
        self.score = torch.nn.Linear(channels, 1, bias=False)       # RpGAN sees only D(real) - D(fake)
        self.embed = torch.nn.Linear(num_classes, channels, bias=False)

    def forward(self, h, label):
        h = unet.mp_silu(unet.normalize(self.conv(h), dim=1)).mean(dim=(2, 3))   # (N, channels)
        return self.score(h).squeeze(1) + (self.embed(label) * h).sum(dim=1)    # (N,)


def discriminator(head, encoder, x, t, eps, label):
    """D(x): the image noised to t_D, x_tD = (1 - t_D) x + t_D eps, through the frozen encoder (its
    parameters take no gradient; x does) and the trainable head. Scores (N,)."""
    x_t = torch.lerp(x, eps, bcast(t, x))                                   # (N, C, R, R)
    return head(encoder.features(x_t, t, label=label), label)


def build_discriminator(teacher, preset, num_classes, lr, device):
    """(D, its trainable head, the head's Adam): D(x, t, eps, label) on the frozen teacher's encoder."""
    arch = unet.PRESETS[preset]
    head = DiscriminatorHead(arch["model_channels"] * arch["channel_mult"][-1], num_classes).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, betas=ADV_BETAS)
    return functools.partial(discriminator, head, teacher), head, optimizer


def few_step_samples(net, z, u, t_max=1.0, **cond):
    """Flow-map samples from noise (docs/method.md §8) with the graph kept: f(f(z, 1, u), u, 0), one step
    where u = 1 (f(z, 1, 1) = z exactly), two where u < 1. t_max < 1 (an EDM2 teacher's range): the
    same from t_max z, with the middle time u t_max (flowmap.time_grid)."""
    start, u, zero = torch.full_like(u, t_max), u * t_max, torch.zeros_like(u)
    return flow_map(net, flow_map(net, t_max * z, start, u, **cond), u, zero, **cond)


def rpgan_g_objective(net, D, real, z, u, d_cond, t_max=1.0, **cond):
    """The generator's adversarial term (docs/method.md §7): RpGAN softplus(D(real) - D(fake)), with
    fake = a few-step sample from noise z at the row's cond, paired with the real image of the same
    label; D at the pair's noise level and noise d_cond. Returns (per-sample loss (N,), fake)."""
    fake = few_step_samples(net, z, u, t_max, **cond)                       # (N, C, R, R)
    return rpgan_g_loss(D(real, **d_cond), D(fake, **d_cond)), fake


def rpgan_d_objective(D, real, fake, gamma, **cond):
    """The discriminator's per-sample objective, RpGAN + gamma/2 (R1 + R2) (R3GAN; docs/method.md §7), and
    its parts for the log: (objective, RpGAN D loss, D(real) - D(fake), R1 + R2), each (N,)."""
    d_real, d_fake = D(real, **cond), D(fake, **cond)
    d_loss = rpgan_d_loss(d_real, d_fake)
    penalty = grad_penalty(D, real, **cond) + grad_penalty(D, fake, **cond)    # ||grad_x D||^2, R1 + R2
    return d_loss + gamma / 2 * penalty, d_loss.detach(), (d_real - d_fake).detach(), penalty.detach()
