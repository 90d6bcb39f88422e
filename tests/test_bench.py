"""bench.py end to end on a CPU at toy size: every row is there with a finite positive time, and the
network calls of each sampler, counted by a wrapper, are what the sampler's NFE says. No timing
assertions: the machine is shared."""
import json
import math

import pytest
import torch

import bench
from flowmap import sample_flow_map, sample_ode

STEP_KINDS = ["forward (student)", "forward (guide)", "FM step (teacher)", "EMD (a)", "EMD + autoguide", "LMD",
              "LMD + autoguide", "EMD (a1) two passes", "EMD (a2) torch.func.jvp", "EMD (b) PyTorch one pass",
              "EMD (c) finite diff."]
SAMPLERS = {"flow map, 1 step": 1, "flow map, 2 steps": 2, "flow map, 4 steps": 4, "flow map, 8 steps": 8,
            "teacher Heun, 32 steps": 63}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = bench.main(["--preset", "tiny", "--batch", "2", "--resolution", "16", "--device", "cpu",
                      "--reps", "2", "--warmup", "1", "--scan-batch", "1,2", "--json", str(path)])
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(out["rows"]))
    return out


def rows(result, section):
    return {row["name"]: row for row in result["rows"] if row["section"] == section}


def test_every_step_kind_has_a_finite_positive_time_memory_and_flops(result):
    steps = rows(result, "steps")
    assert list(steps) == STEP_KINDS
    for name, row in steps.items():
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0, name
        assert row["iqr_s"] >= 0 and row["forwards"] > 0 and row["memory_mib"] > 0, name
    assert steps["forward (student)"]["flop_forwards"] == 1
    # The counted FLOPs follow the cost model (module docstring): a backward costs two forwards; the
    # one-pass tangent about one (the convolutions' input tangents), a second pass adds the primal
    # again, and torch.func's convolution rule a third convolution per layer.
    flops = {name: row["flop_forwards"] for name, row in steps.items()}
    assert flops["FM step (teacher)"] == pytest.approx(3, abs=0.1)
    assert flops["EMD (a)"] < flops["EMD (a1) two passes"] - 0.5 < flops["EMD (a2) torch.func.jvp"] - 1.0
    for name in STEP_KINDS[3:]:
        assert {c["name"] for c in steps[name]["checks"]} == {"time/FM", "mem/FM"}, name


def test_tangent_variants_give_the_default_gradient(result):
    steps = rows(result, "steps")
    for name in ("EMD (a1) two passes", "EMD (a2) torch.func.jvp", "EMD (b) PyTorch one pass"):
        assert steps[name]["grad_err"] < 1e-5, name
    assert steps["EMD (c) finite diff."]["grad_err"] < 1e-2                  # O(h^2), approximate


def test_sampling_rows_count_their_network_calls(result):
    sampling = rows(result, "sampling")
    assert list(sampling) == ["forward (student)", *SAMPLERS]
    for name, calls in SAMPLERS.items():
        assert sampling[name]["nfe"] == calls, name
        assert sampling[name]["median_s"] > 0
        assert next(c for c in sampling[name]["checks"] if c["name"] == "calls")["ok"], name


def test_scan_rows(result):
    assert list(rows(result, "scan")) == [f"tiny b{B}: {name}" for B in (1, 2)
                                          for name in ("forward (student)", "FM step (teacher)", "EMD (a)")]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_counting_wrapper_counts_flow_map_and_heun_calls(steps):
    """bench.counting on its own, on a net that is not a U-Net: K-step sampling is K calls, Heun 2K - 1."""
    net, calls = bench.counting(lambda x, t, s: -x)
    sample_flow_map(net, torch.randn(3, 2), steps)
    assert len(calls) == steps
    net, calls = bench.counting(lambda x, t, s: -x)
    sample_ode(lambda x, t: net(x, t, t), torch.randn(3, 2), steps, "heun")
    assert len(calls) == 2 * steps - 1


def test_cpu_working_memory_sees_a_known_allocation():
    """The profiler-based CPU measurement against a known peak: 4 MB + 8 MB alive together."""
    def fn():
        a = torch.ones(1_000_000)                                           # 4 MB
        b = torch.ones(2_000_000)                                           # 8 MB
        return float(a.sum() + b.sum())
    peak = bench.working_memory(fn, torch.device("cpu"))
    assert 12_000_000 <= peak < 12_100_000



def test_channels_last_gives_the_same_losses_and_gradients():
    """--channels-last changes the memory layout only: every step kind's loss and gradient agree."""
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        nets = bench.build_networks("tiny", "tiny", 16, torch.device("cpu"), fmt)
        data = bench.make_batch(2, 16, torch.device("cpu"), 0, fmt)
        assert nets["student"].conv_out.weight.is_contiguous(memory_format=fmt)
        grads.append({})
        for name, (key, loss_fn) in bench.step_kinds(nets, data, variants=False).items():
            net = nets[key]
            grad = torch.autograd.grad(loss_fn(net).sum(), [p for p in net.parameters() if p.requires_grad],
                                       allow_unused=True)
            grads[-1][name] = torch.cat([torch.zeros(0) if g is None else g.flatten() for g in grad])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)
