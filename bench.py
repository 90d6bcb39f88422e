"""Speed and memory of one AYF training step of every kind, and of sampling, in network forwards.

    python bench.py --preset tiny --batch 8 --resolution 32 --device cpu --reps 10     # ~2 min, one core
    python bench.py --preset small --guide-preset tiny --device cpu --reps 5          # guide 1/3 of student
    python bench.py --preset tiny --scan-batch 4,8,16 --scan-preset tiny,small        # + scaling rows
    python bench.py --preset S --guide-preset XS --batch 128 --json bench-S.json      # one GPU, bf16
    python bench.py --preset S --guide-preset XS --batch 128 --channels-last          # the same, NHWC

Cost model (docs/method.md §3-4). The unit is one forward of the network. A flow-matching step is
a forward and a backward, about 3 units. A distillation step adds the tangent dF/dt (EMD) or dF/ds
(LMD), about 1 unit when it comes out of the trainable forward itself (jvp.py; 2 units as a separate
pass that recomputes the primal), and the teacher (1 unit, plus the weak guide's): about 5 units.
Targets, each a ratio measured side by side in one run:

    EMD / LMD step <= 2.0 x the teacher's flow-matching step, same preset and batch
                   <= 2.3 x with autoguidance (a guide of --guide-preset: XS under an S on a GPU,
                        about 0.45 units; on a CPU 'tiny', the teacher's own size under --preset tiny,
                        1 unit, so read the guided ratios there with that in mind)
    working memory of a distillation step <= 1.5 x the flow-matching step's
    K-step flow-map sampling: K network calls (counted), time within 5% of K forwards
    1-step flow-map sampling >= 30 x faster than the teacher's 32-step Heun ODE (63 calls)

Steps. Each kind is one iteration of train_imagenet.py's loop on one batch: the loss (autocast with
--precision bf16), backward, the gradient norm and its finiteness check (the NaN guard, which
synchronizes), Adam, forced weight normalization (normalize_weights_) and the EMA update. Random
weights: the time does not depend on training. The networks run once before anything is timed.

Tangent variants, timed as EMD steps beside the others (jvp.py explains the default):
    (a)  losses.emd_loss as it is: one forward pass gives F_theta with its graph and the tangent
         dF/dt without, from jvp.py's tangent rules
    (a1) the same rules in two passes: a JVP of the stop-gradient network without graph, then the
         trainable forward (the primal is computed twice)
    (a2) two passes with torch.func.jvp, PyTorch's built-in forward-mode rules (its convolution rule
         also convolves x with the weights' all-zero tangent: a third convolution per layer)
    (b)  one pass with PyTorch's built-in rules: autograd also records the tangent's computation,
         because the weights require grad
    (c)  central finite differences, approximate, for reference
The "grad err" column is each variant's relative gradient difference from (a) on one batch.

Timing. Every kind runs --warmup times untimed; then the kinds take turns for --reps rounds, so that
a slow stretch of a shared machine hits all of them alike. The table shows medians and the
interquartile range; ratios are medians of the per-round ratios. CUDA is synchronized around every
timed call. On a CPU torch uses --threads threads, 1 by default: the numbers are one-core numbers,
and other jobs on the machine still add noise (compare the IQR with the differences you read).

Memory ("work MiB"): the peak of allocated tensor memory during a step above what was allocated
when it started, so weights, optimizer state and EMA stay out; activations, gradients and
temporaries count. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU: the
same quantity from the allocation events of torch.profiler(profile_memory=True) on one extra step
(gradients freed before it, as the profiler cannot see frees of older tensors). It counts tensors
only: not oneDNN's scratch buffers nor the allocator's caching, so it is not the resident memory.

FLOPs: FlopCounterMode counts the matmul and convolution FLOPs that one step actually runs
(forward-mode tangents included); "FLOP fwds" divides them by one forward's, a cost model
independent of the machine. On a GPU MFU = counted FLOPs / median time / --peak-tflops (989 TFLOP/s:
H100 SXM, dense bf16; it is the bf16 peak whatever --precision says).
"""
import os

# Spinning OpenMP threads make CPU runs on shared cores many times slower (see train_imagenet.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import functools
import json
import statistics
import time
import warnings
from unittest import mock

import torch
import torch.nn.functional as nnf
from torch._C._profiler import _EventType
from torch.utils.flop_counter import FlopCounterMode

import jvp
import losses
import unet
from flowmap import as_velocity, bcast, guided_velocity, sample_flow_map, sample_ode
from losses import emd_loss, fm_loss, lmd_loss, sample_t_s

# unet.PRESETS plus a CPU-sized student between tiny and XS (3 x tiny's forward time at 32x32).
PRESETS = dict(unet.PRESETS, small=dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2,
                                        attn_resolutions=(16,), channels_per_head=32))
NUM_CLASSES = 1000                  # ImageNet's label width: the label embedding is part of the cost
R_MAX, C = 0.99, 0.1                # end value of the tangent warmup, tangent normalization (docs/method.md §3)
LR, EMA_BETA = 1e-4, 0.999          # any values: the time of a step does not depend on them
SAMPLER_STEPS = (1, 2, 4, 8)        # flow-map sampling
TEACHER_STEPS = 32                  # the teacher's Heun ODE: 2 x 32 - 1 = 63 network calls
TARGETS = dict(step=2.0, guided_step=2.3, memory=1.5, per_forward=0.05, speedup=30.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--preset",       default="tiny",  choices=list(PRESETS), help="teacher and student size")
    add("--guide-preset", default=None,    choices=list(PRESETS), help="weak guide (tiny on a CPU, XS on a GPU)")
    add("--batch",        default=8,       type=int)
    add("--resolution",   default=32,      type=int)
    add("--device",       default="auto",                help="auto (cuda if available), cuda or cpu")
    add("--precision",    default=None,    choices=["fp32", "bf16"], help="fp32 on a CPU, bf16 on a GPU")
    add("--reps",         default=10,      type=int,     help="timed rounds")
    add("--warmup",       default=2,       type=int,     help="untimed runs of every kind first")
    add("--threads",      default=1,       type=int,     help="CPU: torch threads (the cores are shared)")
    add("--peak-tflops",  default=989.0,   type=float,   help="GPU peak for MFU (H100 SXM dense bf16)")
    add("--scan-batch",   default="",                    help="also time FM and EMD at these batch sizes")
    add("--scan-preset",  default="",                    help="also time FM and EMD at these presets")
    add("--channels-last", action="store_true",         help="weights and images in channels-last memory format")
    add("--seed",         default=0,       type=int)
    add("--json",         default=None,                  help="write every row and check here")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device.startswith("cuda")
    args.guide_preset = args.guide_preset or ("XS" if on_gpu else "tiny")
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.scan_batch = [int(b) for b in args.scan_batch.split(",") if b]
    args.scan_preset = [q for q in args.scan_preset.split(",") if q]
    for q in args.scan_preset:
        if q not in PRESETS:
            raise ValueError(f"--scan-preset {q!r}: not one of {list(PRESETS)}")
    if args.warmup < 1 or args.reps < 1:
        raise ValueError("--warmup and --reps must be at least 1 (the warm-up also runs the lazy initializations)")
    return args


# ----------------------------------------------------------------------------------------------
# Networks, data, and one training step.

def memory_format_of(args):
    return torch.channels_last if args.channels_last else torch.contiguous_format


def build_networks(preset, guide_preset, resolution, device, memory_format=torch.contiguous_format):
    """A frozen teacher and guide (as load_snapshot gives them), a trainable copy of the teacher for
    flow matching, and students without and with a lam input, initialized from the teacher."""
    def build(name, **inputs):
        net = unet.UNet(img_resolution=resolution, num_classes=NUM_CLASSES, **PRESETS[name], **inputs)
        return net.to(device, memory_format=memory_format)

    teacher = build(preset).eval().requires_grad_(False)
    guide = build(guide_preset).eval().requires_grad_(False)
    fm_net = copy.deepcopy(teacher).train().requires_grad_(True)
    student = unet.init_student_from_teacher(build(preset, cond_s=True), teacher.state_dict()).train()
    student_lam = unet.init_student_from_teacher(build(preset, cond_s=True, cond_lam=True),
                                                 teacher.state_dict()).train()
    return dict(teacher=teacher, guide=guide, fm=fm_net, student=student, student_lam=student_lam)


def make_batch(batch, resolution, device, seed, memory_format=torch.contiguous_format):
    """One batch of every input a step needs; x0 uniform in [-1, 1] stands in for images."""
    gen = torch.Generator(device).manual_seed(seed)
    x0 = 2 * torch.rand(batch, 3, resolution, resolution, generator=gen, device=device) - 1   # (B, 3, R, R)
    eps = torch.randn(x0.shape, generator=gen, device=device)
    x0, eps = x0.contiguous(memory_format=memory_format), eps.contiguous(memory_format=memory_format)
    t, s = sample_t_s(batch, generator=gen, device=device)                  # (B,), 1 >= t >= s >= 0
    return dict(x0=x0, eps=eps, t=t, s=s, x_t=torch.lerp(x0, eps, bcast(t, x0)),
                t_fm=torch.sigmoid(-0.8 + 1.6 * torch.randn(batch, generator=gen, device=device)),
                lam=1 + 2 * torch.rand(batch, generator=gen, device=device),     # lam ~ U[1, 3]
                label=nnf.one_hot(torch.randint(NUM_CLASSES, (batch,), generator=gen, device=device),
                                  NUM_CLASSES).float())


def trainer(net):
    """(net, its EMA, Adam), as train_imagenet.py sets them up."""
    return net, copy.deepcopy(net).eval().requires_grad_(False), torch.optim.Adam(net.parameters(), lr=LR,
                                                                                   betas=(0.9, 0.99))


def train_step(trained, loss_fn, autocast):
    """One iteration of train_imagenet.py's main loop as a function: per-sample loss, backward, NaN
    guard, Adam, forced weight normalization, EMA."""
    net, ema, optimizer = trained

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(net)                                             # (B,)
        (loss.sum() / len(loss)).backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
        if not torch.isfinite(grad_norm):                                   # synchronizes, like the NaN guard
            raise FloatingPointError("non-finite gradient in a benchmark step")
        optimizer.step()
        net.normalize_weights_()
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - EMA_BETA)
    return step


def inference(fn, autocast):
    """fn() without graph, under the run's autocast."""
    def run():
        with torch.no_grad(), autocast:
            return fn()
    return run


# ----------------------------------------------------------------------------------------------
# The tangent variants that are not losses.py's default (module docstring).

def two_passes(jvp_fn):
    """A value_and_jvp that takes the tangent from jvp_fn(fn, primals, tangents) -> (out, tangent),
    run without graph (the stop-gradient network), and then F_theta from a separate forward."""
    def value_and_jvp(fn, primals, tangents, method="exact"):
        tangents = [torch.zeros_like(p) if u is None else u for p, u in zip(primals, tangents)]
        with torch.no_grad():
            _, tangent = jvp_fn(fn, tuple(primals), tuple(tangents))
        return fn(*primals), tangent
    return value_and_jvp


def emd_loss_two_passes(jvp_fn):
    """(a1), (a2): emd_loss with its one pass replaced by two_passes(jvp_fn)."""
    def loss(*args, **kwargs):
        with mock.patch.object(losses, "value_and_jvp", two_passes(jvp_fn)):
            return emd_loss(*args, **kwargs)
    return loss


emd_loss_a1 = emd_loss_two_passes(jvp.value_and_jvp)
emd_loss_a2 = emd_loss_two_passes(torch.func.jvp)


def emd_loss_b(*args, **kwargs):
    """(b): emd_loss's single pass with every operation left to PyTorch's forward-mode rules."""
    with mock.patch.object(jvp, "RULES", {}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "jvp.py has no tangent rule")    # every operation, on purpose
        return emd_loss(*args, **kwargs)


def grad_error(net, loss_fn, reference, autocast):
    """max |grad - grad_ref| / max |grad_ref| of two loss functions on the same weights."""
    grads = []
    for loss_fn in (loss_fn, reference):
        with autocast:
            loss = loss_fn(net).sum()
        params = list(net.parameters())
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]))
    return ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()


def step_kinds(nets, data, variants=True):
    """{name: (trained network key, per-sample loss of the network)}: every kind of step on one batch."""
    d = data
    velocity = as_velocity(nets["teacher"])
    guided = functools.partial(guided_velocity, as_velocity(nets["teacher"]), as_velocity(nets["guide"]))
    plain, lam = dict(label=d["label"]), dict(label=d["label"], lam=d["lam"])
    x_t, t, s = d["x_t"], d["t"], d["s"]
    losses_of = {
        "FM step (teacher)": ("fm", lambda net: fm_loss(net, d["x0"], d["eps"], d["t_fm"], **plain)),
        "EMD (a)": ("student", lambda net: emd_loss(net, velocity, x_t, t, s, R_MAX, C, **plain)),
        "EMD + autoguide": ("student_lam", lambda net: emd_loss(net, guided, x_t, t, s, R_MAX, C, **lam)),
        "LMD": ("student", lambda net: lmd_loss(net, velocity, x_t, t, s, C, **plain)),
        "LMD + autoguide": ("student_lam", lambda net: lmd_loss(net, guided, x_t, t, s, C, **lam)),
    }
    if variants:
        emd = lambda loss: lambda net: loss(net, velocity, x_t, t, s, R_MAX, C, **plain)   # noqa: E731
        losses_of.update({
            "EMD (a1) two passes": ("student", emd(emd_loss_a1)),
            "EMD (a2) torch.func.jvp": ("student", emd(emd_loss_a2)),
            "EMD (b) PyTorch one pass": ("student", emd(emd_loss_b)),
            "EMD (c) finite diff.": ("student", emd(functools.partial(emd_loss, jvp_method="fd"))),
        })
    return losses_of


# ----------------------------------------------------------------------------------------------
# Measurements.

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def take_turns(kinds, reps, warmup, device):
    """{name: [seconds]}: every kind `warmup` times untimed, then `reps` rounds of one call each."""
    for fn in kinds.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in kinds}
    for _ in range(reps):
        for name, fn in kinds.items():
            sync(device)
            tick = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - tick)
    return times


def summary(seconds):
    """(median, interquartile range); with fewer than 4 samples the range is max - min."""
    if len(seconds) < 4:
        return statistics.median(seconds), max(seconds) - min(seconds)
    q1, _, q3 = statistics.quantiles(seconds, n=4)
    return statistics.median(seconds), q3 - q1


def paired_ratio(times, name, reference, scale=1.0):
    """Median over the rounds of time[name] / (scale x time[reference]) in the same round."""
    return statistics.median(a / (scale * b) for a, b in zip(times[name], times[reference]))


def working_memory(fn, device, optimizer=None):
    """Peak allocated tensor bytes during fn() above those allocated when it started (module docstring)."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)                               # frees the profiler would not see
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocation events carry the allocator's running total (a private but long-lived profiler API:
    # experimental_event_tree is what torch.profiler's memory timeline reads). The total also holds
    # blocks allocated under earlier profilers and freed outside them, so count from the first event.
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size))
        stack.extend(event.children)
    if not events:
        return 0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start


def counted_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def counting(net):
    """net, and a list that grows by one per call: network evaluations counted, not assumed."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return net(*args, **kwargs)
    return counted, calls


# ----------------------------------------------------------------------------------------------
# The benchmark.

def check(name, value, target, op="<="):
    """A target: value <= target, >= target, == target, or within 1 +- target ("1 +-")."""
    ok = {"<=": value <= target, ">=": value >= target, "==": value == target, "1 +-": abs(value - 1) <= target}[op]
    return dict(name=name, value=value, target=target, op=op, ok=bool(ok))


def row_of(section, name, seconds, batch, **extra):
    median, iqr = summary(seconds)
    return dict(section=section, name=name, median_s=median, iqr_s=iqr, images_per_s=batch / median,
                checks=[], **extra)


def bench_steps(args, nets, trained, data, autocast, device):
    """Rows of the training-step section: two forwards (the unit, the guide's), every kind of step."""
    d, unit, fm = data, "forward (student)", "FM step (teacher)"
    forwards = {
        unit: inference(lambda: nets["student"](d["x_t"], d["t"], d["s"], label=d["label"]), autocast),
        "forward (guide)": inference(lambda: nets["guide"](d["x_t"], d["t"], d["t"], label=d["label"]), autocast),
    }
    kinds = step_kinds(nets, data)
    steps = {name: train_step(trained[key], loss_fn, autocast) for name, (key, loss_fn) in kinds.items()}
    grad_err = {name: grad_error(trained[key][0], loss_fn, kinds["EMD (a)"][1], autocast)
                for name, (key, loss_fn) in kinds.items() if name.startswith("EMD (") and name != "EMD (a)"}

    times = take_turns({**forwards, **steps}, args.reps, args.warmup, device)
    memory = {name: working_memory(fn, device) for name, fn in forwards.items()}
    memory.update({name: working_memory(fn, device, trained[kinds[name][0]][2]) for name, fn in steps.items()})
    flops = {name: counted_flops(fn) for name, fn in {**forwards, **steps}.items()}
    rows = []
    for name in times:
        row = row_of("steps", name, times[name], args.batch, forwards=paired_ratio(times, name, unit),
                     flop_forwards=flops[name] / flops[unit], flops=flops[name], memory_mib=memory[name] / 2**20,
                     grad_err=grad_err.get(name))
        if device.type == "cuda":
            row["mfu"] = flops[name] / row["median_s"] / (args.peak_tflops * 1e12)
        if name in steps and name != fm:
            target = TARGETS["guided_step"] if "autoguide" in name else TARGETS["step"]
            row["checks"].append(check("time/FM", paired_ratio(times, name, fm), target))
            row["checks"].append(check("mem/FM", memory[name] / memory[fm], TARGETS["memory"]))
        rows.append(row)
    return rows


def bench_sampling(args, nets, data, autocast, device):
    """Rows of the sampling section: flow-map sampling at 1, 2, 4, 8 steps, the teacher's Heun ODE."""
    student, teacher, z, label = nets["student"], nets["teacher"], data["eps"], data["label"]
    heun = f"teacher Heun, {TEACHER_STEPS} steps"
    samplers = {f"flow map, {k} step{'s' * (k > 1)}": (student, k, functools.partial(sample_flow_map, steps=k))
                for k in SAMPLER_STEPS}
    samplers[heun] = (teacher, 2 * TEACHER_STEPS - 1,
                      lambda net, z, **cond: sample_ode(as_velocity(net), z, TEACHER_STEPS, "heun", **cond))
    calls = {}
    for name, (net, _, sample) in samplers.items():
        counted, calls[name] = counting(net)
        inference(lambda: sample(counted, z, label=label), autocast)()

    unit = "forward (student)"
    runs = {unit: inference(lambda: student(z, data["t"], data["s"], label=label), autocast)}
    runs.update({name: inference(functools.partial(sample, net, z, label=label), autocast)
                 for name, (net, _, sample) in samplers.items()})
    times = take_turns(runs, args.reps, args.warmup, device)
    rows = []
    for name in runs:
        row = row_of("sampling", name, times[name], args.batch, forwards=paired_ratio(times, name, unit))
        if name in samplers:
            nfe = row["nfe"] = len(calls[name])
            row["checks"].append(check("calls", nfe, samplers[name][1], "=="))
            if name != heun:
                row["checks"].append(check("time/(calls x fwd)", paired_ratio(times, name, unit, nfe),
                                           TARGETS["per_forward"], "1 +-"))
            if nfe == 1:
                row["checks"].append(check(f"Heun-{2 * TEACHER_STEPS - 1} time / this", paired_ratio(times, heun, name),
                                           TARGETS["speedup"], ">="))
        rows.append(row)
    return rows


def bench_scan(args, autocast, device):
    """Forward, FM and EMD (a) at every --scan-preset x --scan-batch (either defaults to the main run's)."""
    rows = []
    for preset in args.scan_preset or [args.preset]:
        nets = build_networks(preset, args.guide_preset, args.resolution, device, memory_format_of(args))
        trained = {key: trainer(nets[key]) for key in ("fm", "student")}
        for B in args.scan_batch or [args.batch]:
            d = make_batch(B, args.resolution, device, args.seed, memory_format_of(args))
            kinds = step_kinds(nets, d, variants=False)
            runs = {"forward (student)": inference(lambda: nets["student"](d["x_t"], d["t"], d["s"], label=d["label"]),
                                                   autocast)}
            runs.update({name: train_step(trained[kinds[name][0]], kinds[name][1], autocast)
                         for name in ("FM step (teacher)", "EMD (a)")})
            times = take_turns(runs, args.reps, args.warmup, device)
            for name in runs:
                row = row_of("scan", f"{preset} b{B}: {name}", times[name], B,
                             forwards=paired_ratio(times, name, "forward (student)"))
                if name == "EMD (a)":
                    row["info"] = f"time/FM {paired_ratio(times, name, 'FM step (teacher)'):.3g}"
                rows.append(row)
    return rows


def print_table(rows, cuda):
    """The one table: a row per measurement, then its checks against the targets (PASS / MISS)."""
    def cell(row, key, fmt, width):
        value = row.get(key)
        return f" {'' if value is None else format(value, fmt):>{width}}"

    header = (f"{'what':<28} {'median ms':>10} {'IQR ms':>8} {'fwds':>6} {'FLOP fwds':>9} {'work MiB':>9} "
              f"{'img/s':>8}" + (f" {'MFU':>6}" if cuda else "") + f" {'grad err':>8}  checks")
    print(header)
    section = None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            print(f"-- {section} " + "-" * (len(header) - len(section) - 4))
        checks = "; ".join(f"{c['name']} {c['value']:.3g} [{c['op']} {c['target']:g}] {'PASS' if c['ok'] else 'MISS'}"
                           for c in row["checks"]) or row.get("info", "")
        print(f"{row['name']:<28} {row['median_s'] * 1e3:>10.1f} {row['iqr_s'] * 1e3:>8.1f}"
              + cell(row, "forwards", ".2f", 6) + cell(row, "flop_forwards", ".2f", 9)
              + cell(row, "memory_mib", ".1f", 9) + cell(row, "images_per_s", ".1f", 8)
              + (cell(row, "mfu", ".1%", 6) if cuda else "") + cell(row, "grad_err", ".0e", 8) + f"  {checks}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(args.threads)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    torch.manual_seed(args.seed)

    nets = build_networks(args.preset, args.guide_preset, args.resolution, device, memory_format_of(args))
    trained = {key: trainer(nets[key]) for key in ("fm", "student", "student_lam")}
    data = make_batch(args.batch, args.resolution, device, args.seed, memory_format_of(args))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"torch {torch.__version__} on {where}; preset {args.preset} "
          f"({unet.num_params(nets['student']) / 1e6:.2f} M), guide {args.guide_preset} "
          f"({unet.num_params(nets['guide']) / 1e6:.2f} M), batch {args.batch}, {args.resolution}x{args.resolution}, "
          f"{args.precision}; median of {args.reps} rounds after {args.warmup} warm-up run(s)")

    rows = bench_steps(args, nets, trained, data, autocast, device)
    rows += bench_sampling(args, nets, data, autocast, device)
    if args.scan_batch or args.scan_preset:
        rows += bench_scan(args, autocast, device)
    print_table(rows, device.type == "cuda")
    checks = [c for row in rows for c in row["checks"]]
    print(f"{sum(c['ok'] for c in checks)} of {len(checks)} checks pass. fwds: time in forwards of the student "
          f"(paired per round); FLOP fwds: counted FLOPs in forwards; work MiB: peak tensor memory above the "
          f"step's start" + ("" if device.type == "cuda" else " (profiler, tensors only)") + ".")
    result = dict(config=vars(args), torch=torch.__version__, device=where, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
