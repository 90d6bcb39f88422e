"""EDM2's published ImageNet-64 networks as teachers, loaded without EDM2's code and without running
any code from the pickle.

    net, config = edm2.load("edm2-img64-s-1073741-0.045.pkl")    # a unet.UNet(numerics="edm2")
    v = net(x_t, t, t, label=one_hot)                             # the teacher velocity, our convention

AYF distills EDM2-S guided by EDM2-XS (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", and the autoguidance paper). Those networks are EDM denoisers
D(x_sigma, sigma) on x_sigma = x0 + sigma eps; unet.UNet with numerics="edm2" computes the same
function as a velocity on our path x_t = (1 - t) x0 + t eps (docs/method.md §1), with sigma = t / (1 - t):

    x_sigma = x_t / (1 - t),   v(x_t, t) = E[eps - x0 | x_t] = (x_t - D(x_t / (1 - t), sigma)) / t

(derivation in the UNet class docstring; velocity_from_denoiser below is the formula by itself).

The file format. EDM2 snapshots are plain pickles of a dict {"ema": network, "encoder": ...,
"loss_fn": ..., "dataset_kwargs": ...}, written by EDM2's torch_utils.persistence: every object of
an EDM2 class pickles as a call of the hook torch_utils.persistence._reconstruct_persistent_obj(meta)
with meta = {type, version, module_src (the source code of its module), class_name, state (its
__dict__)}. EDM2's own loader executes module_src. We never do: the restricted unpickler below
allows exactly the globals such a file needs (tensor and storage rebuilding, OrderedDict, EDM2's
EasyDict, torch's ModuleDict, the persistence hook), and turns every persistent object and
ModuleDict into a Record (class name + state). Any other global, such as os.system or
builtins.eval, stops the load with an error. Storages are read with torch.load(weights_only=True).
"""
import collections
import io
import pickle
from pathlib import Path

import torch

import unet

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0         # EDM2's range of sigma (its sampler's, EDM Table 1)
T_MIN = SIGMA_MIN / (1 + SIGMA_MIN)        # the same range in t = sigma / (1 + sigma): [0.001996, 80 / 81]
T_MAX = SIGMA_MAX / (1 + SIGMA_MAX)

# EDM2's architecture options with the values its published networks use; unet.py builds exactly
# these (its constants, fixed Fourier width, avg-pool / nearest resampling). Anything else: refused.
EDM2_DEFAULTS = dict(channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8], channels_per_head=64,
                     channel_mult_noise=None, channel_mult_emb=None, label_balance=unet.LABEL_BALANCE,
                     concat_balance=unet.CONCAT_BALANCE, res_balance=unet.RES_BALANCE,
                     attn_balance=unet.ATTN_BALANCE, resample_filter=[1, 1], clip_act=unet.CLIP_ACT)
ARCH_KEYS = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "channels_per_head")


def sigma_of(t):
    """EDM's noise level of our time t: x_t / (1 - t) = x0 + sigma eps with sigma = t / (1 - t)."""
    return t / (1 - t)


def t_of(sigma):
    """Our time of EDM's noise level sigma (the inverse of sigma_of)."""
    return sigma / (1 + sigma)


def velocity_from_denoiser(denoiser, x_t, t, **cond):
    """v(x_t, t) = (x_t - D(x_t / (1 - t), sigma)) / t for an EDM denoiser D(x_sigma, sigma) ~ E[x0 | x_sigma].

    From x_t = (1 - t) x0 + t eps: eps = (x_t - (1 - t) x0) / t, so E[eps - x0 | x_t] = (x_t - E[x0]) / t,
    and E[x0 | x_t] = D(x_t / (1 - t), sigma) since x_t / (1 - t) = x0 + sigma eps. t: (N,), 0 < t < 1.
    """
    t_ = t.reshape(-1, *([1] * (x_t.ndim - 1)))
    return (x_t - denoiser(x_t / (1 - t_), sigma_of(t), **cond)) / t_


# ----------------------------------------------------------------------------------------------
# The restricted unpickler.

class Record:
    """What an EDM2 object becomes: its class name and its pickled state (a dict), no behaviour."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state):                 # a torch.nn.ModuleDict: pickle's BUILD gives the state
        self.state = state

    def __repr__(self):
        return f"Record({self.class_name})"


class ModuleDictRecord(Record):
    def __init__(self):                             # pickle creates it with cls.__new__, then __setstate__
        super().__init__("ModuleDict", {})


class EasyDict(dict):
    """Stand-in for EDM2's dnnlib.util.EasyDict: a plain dict."""


def _persistent_object(meta):
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj: keep the state, never run module_src."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("an EDM2 persistent object without a class state: not an EDM2 network pickle")
    return Record(meta["class_name"], meta["state"])


def _storage_from_bytes(data):
    """Stand-in for torch.storage._load_from_bytes: the same bytes, read by torch's weights-only loader."""
    return torch.load(io.BytesIO(data), weights_only=True)


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals in ALLOWED (see the module docstring)."""

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: an EDM2 network pickle needs only tensors and EDM2's "
                f"persistent objects, and this loader runs nothing else. Is the file from an untrusted source?")
        return ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of EDM2's pickle format")


class StructureUnpickler(RestrictedUnpickler):
    """The same, with every tensor left out (None): the structure and the settings, read quickly."""

    def find_class(self, module, name):
        found = super().find_class(module, name)
        return _no_tensor if module in ("torch._utils", "torch.storage") else found


def _no_tensor(*args, **kwargs):
    return None


def read_pickle(path, tensors=True):
    """The top-level object of an EDM2 pickle, with Records in place of EDM2's objects."""
    with open(path, "rb") as f:
        return (RestrictedUnpickler if tensors else StructureUnpickler)(f).load()


def read_config(path):
    """The config of an EDM2 pickle (see config_of) without building its tensors."""
    return config_of(read_pickle(path, tensors=False), path)


def is_edm2_pickle(path):
    """True for an EDM2 snapshot file (*.pkl; ours are run folders or snapshot.pt)."""
    path = Path(path)
    return path.is_file() and path.suffix == ".pkl"


# ----------------------------------------------------------------------------------------------
# From EDM2's layout to unet.py's.

def tensors(record, prefix=""):
    """{dotted name: tensor} of a module Record and its children, as a state_dict would list them."""
    state, out = record.state, {}
    for name, p in state.get("_parameters", {}).items():
        if p is not None:
            out[prefix + name] = p
    skip = state.get("_non_persistent_buffers_set", set())
    for name, b in state.get("_buffers", {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            out.update(tensors(child, f"{prefix}{name}."))
    return out


def key_map(channel_mult, num_blocks, resolution=64):
    """{EDM2 module name: unet.UNet module name}. EDM2 names its encoder and decoder modules by
    resolution (ModuleDicts 'enc' and 'dec'); unet.py keeps the first conv apart (conv_in) and
    numbers the blocks in the same order in ModuleLists. Per module the tensor names are the same."""
    names = {"unet.emb_fourier": "emb_fourier", "unet.emb_noise": "emb_t", "unet.emb_label": "emb_label",
             "unet.out_conv": "conv_out"}
    enc = []
    for level in range(len(channel_mult)):
        res = resolution >> level
        if level == 0:
            names[f"unet.enc.{res}x{res}_conv"] = "conv_in"
        else:
            enc.append(f"{res}x{res}_down")
        enc += [f"{res}x{res}_block{i}" for i in range(num_blocks)]
    dec = []
    for level in reversed(range(len(channel_mult))):
        res = resolution >> level
        dec += [f"{res}x{res}_in0", f"{res}x{res}_in1"] if level == len(channel_mult) - 1 else [f"{res}x{res}_up"]
        dec += [f"{res}x{res}_block{i}" for i in range(num_blocks + 1)]
    names.update({f"unet.enc.{name}": f"enc.{i}" for i, name in enumerate(enc)})
    names.update({f"unet.dec.{name}": f"dec.{i}" for i, name in enumerate(dec)})
    return names


def state_dict_for_unet(edm2_tensors, names):
    """Rename EDM2's tensors to unet.py's (float32). EDM2's uncertainty head (logvar_*) is not part
    of the denoiser and is dropped; a tensor that no rule maps is an error."""
    out, unmapped = {}, []
    for key, value in edm2_tensors.items():
        if key.startswith(("logvar_fourier.", "logvar_linear.")):
            continue
        if key == "unet.out_gain":
            out["out_gain"] = value
            continue
        parts = key.split(".")                     # unet.enc.16x16_block0.conv_res0.weight
        module = next((".".join(parts[:i]) for i in (2, 3) if ".".join(parts[:i]) in names), None)
        if module is None:
            unmapped.append(key)
            continue
        out[names[module] + key[len(module):]] = value
    if unmapped:
        raise ValueError(f"EDM2 pickle has tensors this loader does not know: {unmapped[:3]}")
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def config_of(data, path):
    """Our config for the network in data['ema'], or a one-line error naming what is not supported."""
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Record):
        raise ValueError(f"{path}: no EDM2 network under the key 'ema' (is this an EDM2 snapshot?)")
    precond = data["ema"].state
    encoder = data.get("encoder")
    unet_kwargs = {**EDM2_DEFAULTS, **precond["_modules"]["unet"].state.get("_init_kwargs", {})}
    resolution, channels, classes = precond["img_resolution"], precond["img_channels"], precond["label_dim"]
    if (encoder is not None and encoder.class_name != "StandardRGBEncoder") or channels != 3:
        raise ValueError(f"{path}: a latent-space EDM2 model ({channels} channels, encoder "
                         f"{getattr(encoder, 'class_name', None)}), e.g. ImageNet-512: it needs the Stable Diffusion "
                         f"VAE, which this project does not have. Use an edm2-img64-* pickle.")
    if not classes:
        raise ValueError(f"{path}: an unconditional EDM2 model; AYF's teacher and guide are class-conditional "
                         f"(edm2-img64-s-* and edm2-img64-xs-*)")
    if resolution != 64:
        raise ValueError(f"{path}: resolution {resolution}; only EDM2's ImageNet-64 pixel models are supported")
    unsupported = [f"{k}={unet_kwargs[k]!r}" for k in EDM2_DEFAULTS if k not in ARCH_KEYS
                   and unet_kwargs[k] != EDM2_DEFAULTS[k]]
    if unsupported:
        raise ValueError(f"{path}: EDM2 options unet.py does not implement: {', '.join(unsupported)}")
    arch = {k: tuple(unet_kwargs[k]) if isinstance(unet_kwargs[k], list) else unet_kwargs[k] for k in ARCH_KEYS}
    preset = next((name for name, p in unet.PRESETS.items()
                   if {k: tuple(v) if isinstance(v, list) else v for k, v in
                       {"channels_per_head": 64, **p}.items()} == arch), None)
    if preset is None:
        raise ValueError(f"{path}: EDM2 network of sizes {arch} matches no preset in unet.PRESETS")
    return dict(stage="teacher", preset=preset, resolution=resolution, num_classes=classes,
                cond_s=False, cond_lam=False, dropout=0.0, label_dropout=0.0, numerics="edm2",
                sigma_data=float(precond.get("sigma_data", 0.5)), t_min=T_MIN, t_max=T_MAX,
                edm2_pickle=Path(path).name)


def load(path, device="cpu"):
    """(unet.UNet computing EDM2's network as a velocity, in eval mode and frozen, config)."""
    data = read_pickle(path)
    config = config_of(data, path)
    arch = unet.PRESETS[config["preset"]]
    net = unet.UNet(img_resolution=config["resolution"], num_classes=config["num_classes"], dropout=0.0,
                    sigma_data=config["sigma_data"], numerics="edm2", **arch)
    names = key_map(arch["channel_mult"], arch["num_blocks"], config["resolution"])
    net.load_state_dict(state_dict_for_unet(tensors(data["ema"]), names))
    return net.to(device).eval().requires_grad_(False), config
