"""toy2d.py end to end with a tiny budget: it trains every model, writes its figures and metrics,
reuses its cached checkpoints on a second run, and its EMD distillation learns; its exact velocity
matches an independent brute-force evaluation of the mixture, its exact flow the closed form of a
Gaussian, and its distance to the data the closed form of a shift."""
import functools
import json
import math

import pytest
import torch

import flowmap
import losses
import toy2d


@pytest.mark.parametrize("blur", [1.0, 2.0])
def test_exact_velocity_matches_brute_force(blur):
    # E[eps - x0 | x_t] written directly over (N, K, 2) component tensors with torch.softmax; label -1
    # (unconditional) keeps every component, blur scales every std.
    g = torch.Generator().manual_seed(0)
    n = 300
    x = 1.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    label = torch.randint(-1, toy2d.NUM_CLASSES, (n,), generator=g)
    tt, stds = t[:, None], blur * toy2d.STDS[None]
    m = (1 - tt[..., None]) * toy2d.MEANS[None]                          # (N, K, 2)
    var = (1 - tt) ** 2 * stds ** 2 + tt ** 2                            # (N, K)
    d = x[:, None, :] - m
    log_p = -0.5 * d.square().sum(-1) / var - torch.log(2 * math.pi * var)
    other = (toy2d.COMPONENT_CLASS[None] != label[:, None]) & (label[:, None] >= 0)
    resp = torch.softmax(log_p.masked_fill(other, -math.inf), dim=1)
    gain = (tt - (1 - tt) * stds ** 2) / var
    v_brute = (resp[..., None] * (-toy2d.MEANS[None] + gain[..., None] * d)).sum(1)
    torch.testing.assert_close(toy2d.exact_velocity(x, t, label, blur), v_brute, rtol=1e-9, atol=1e-9)


def test_unconditional_exact_velocity_is_the_class_posterior_mix():
    # Total expectation: v(x) = sum_c P(c | x_t = x) v(x | c), P(c | x) from the class densities.
    g = torch.Generator().manual_seed(1)
    n = 200
    x, t = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    log_class = torch.stack([toy2d._component_log_density(x, t, toy2d.MEANS[toy2d.COMPONENT_CLASS == c],
                                                          toy2d.STDS[toy2d.COMPONENT_CLASS == c])[0].logsumexp(1)
                             for c in range(toy2d.NUM_CLASSES)], dim=1)             # (N, classes) + const
    post = torch.softmax(log_class, dim=1)
    v_c = torch.stack([toy2d.exact_velocity(x, t, torch.full((n,), c)) for c in range(toy2d.NUM_CLASSES)], 1)
    expected = (post[..., None] * v_c).sum(1)
    torch.testing.assert_close(toy2d.exact_velocity(x, t, torch.full((n,), -1)), expected, rtol=1e-9, atol=1e-9)
    teacher = toy2d.exact_teacher()                                     # one-hot, all-zero = unconditional
    onehot = toy2d.one_hot(torch.arange(n) % 2) * (torch.arange(n) % 3 > 0)[:, None]
    k = torch.where(onehot.sum(1) > 0, onehot.argmax(1), -1)
    torch.testing.assert_close(teacher(x.float(), t.float(), label=onehot),
                               toy2d.exact_velocity(x.float(), t.float(), k).float())


def test_exact_flow_lands_on_the_data():
    # Pushing noise through the exact flow map gives data samples: same sliced W2 as fresh data.
    g = torch.Generator().manual_seed(1)
    n = 4000
    label = torch.arange(n) % toy2d.NUM_CLASSES
    x0 = toy2d.exact_flow(torch.randn(n, 2, generator=g), 1.0, 0.0, label)
    data, data2 = toy2d.sample_data(n, label, g), toy2d.sample_data(n, label, g)
    floor = toy2d.sliced_wasserstein(data, data2, label, label)
    assert toy2d.sliced_wasserstein(x0, data, label, label) < 1.5 * floor


def test_exact_flow_of_one_gaussian_is_affine(monkeypatch):
    # One component per class, N(mu_k, c^2 I): x_t = (1 - t) mu + sd(t) xi with sd(t)^2 = (1 - t)^2 c^2 + t^2,
    # so the flow from t = 1 (sd = 1, x = xi) to t is x -> (1 - t) mu + sd(t) x.
    means = torch.tensor([[0.7, -0.2], [-0.4, 0.5]], dtype=torch.float64)
    c = torch.tensor([0.05, 0.3], dtype=torch.float64)
    monkeypatch.setattr(toy2d, "MEANS", means)
    monkeypatch.setattr(toy2d, "STDS", c)
    monkeypatch.setattr(toy2d, "COMPONENT_CLASS", torch.tensor([0, 1]))
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    label = torch.arange(200) % 2
    for t in (0.0, 0.3):
        sd = ((1 - t) ** 2 * c[label] ** 2 + t ** 2).sqrt()[:, None]
        expected = ((1 - t) * means[label] + sd * z).float()
        torch.testing.assert_close(toy2d.exact_flow(z, 1.0, t, label), expected, rtol=0, atol=2e-4)


def test_distance_to_data_of_a_shift():
    # Shifting every point by a: each projection on a unit direction d moves by a.d, so the sliced W2
    # is sqrt(mean_d (a.d)^2) exactly; averaging over two reference sets averages two such distances.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(600, 2, generator=g)
    label = torch.arange(600) % 2
    a, b = torch.tensor([0.3, -0.1]), torch.tensor([0.0, 0.2])
    dirs = toy2d._directions(256, seed=0)
    shift = lambda v: float((v.double() @ dirs).square().mean().sqrt())
    distance = toy2d.DistanceToData([x + a, x + b], label)
    assert abs(distance(x) - (shift(a) + shift(b)) / 2) < 1e-6
    assert abs(toy2d.sliced_wasserstein(x, x + a, label, label) - shift(a)) < 1e-6


def test_student_starts_as_its_teacher():
    teacher = toy2d.MLP(hidden=32, depth=2, x_octaves=2)
    for p in teacher.parameters():
        torch.nn.init.normal_(p)
    student = toy2d.student_from(teacher, hidden=32, depth=2, x_octaves=2)
    x, t, s = torch.randn(16, 2), torch.rand(16), torch.rand(16)
    label = toy2d.one_hot(torch.randint(2, (16,)))
    assert torch.equal(student(x, t, s, label=label, lam=1 + 2 * torch.rand(16)), teacher(x, t, t, label=label))


def test_rows_evaluated_beside_the_training_equal_rows_evaluated_at_the_end():
    """Rows started in forked processes as their models appear (as main() does with --jobs 3) give
    the same samples and numbers, in the tables' order, as every row evaluated at the end in this
    process (--jobs 1)."""
    import argparse
    args = argparse.Namespace(n_eval=200, teacher="exact", guidance=2.0)

    def run(beside):
        models = {}
        ev = toy2d.Evaluation(args, ["emd", "lmd", "cm"], [1, 2], models)
        models.update(v_teacher=toy2d.exact_teacher(), v_guide=toy2d.exact_teacher(2.0))
        ev.start(beside)                                                # the exact teacher's rows
        torch.manual_seed(0)
        models["teacher"] = toy2d.MLP(hidden=16, depth=2, x_octaves=2)
        for m in ("emd", "lmd", "cm"):
            if m == "cm":
                ev.start(beside)                                        # emd's and lmd's rows
            models[m] = toy2d.student_from(models["teacher"], hidden=16, depth=2, x_octaves=2)
            for p in models[m].parameters():
                torch.nn.init.normal_(p, std=0.3)                       # three different flow maps
        return ev.results(beside + 1)                                   # cm's rows: 2 processes, or here

    (results, samples), (here, samples_here) = run(beside=1), run(beside=0)
    assert list(results) == ["exact ODE", "teacher ODE", "MLP teacher ODE", "AYF-EMD", "AYF-LMD",
                             "consistency (EMD, s=0)", "teacher ODE, autoguided lam=2", "teacher ODE, CFG lam=2",
                             "AYF-EMD, autoguided lam=2"]
    assert results == here
    for name, per_k in samples.items():
        for k, x in per_k.items():
            assert torch.equal(x, samples_here[name][k]), (name, k)


@pytest.mark.parametrize("teacher,jobs", [("exact", "3"), ("mlp", "1")])
def test_smoke_run_writes_figure_and_metrics(tmp_path, capsys, teacher, jobs):
    argv = ["--out", str(tmp_path), "--teacher", teacher, "--jobs", jobs, "--teacher-steps", "20", "--guide-steps", "10", "--distill-steps", "10",
            "--adv-steps", "4", "--n-eval", "400", "--steps", "1,2", "--batch", "64", "--teacher-batch", "64"]
    toy2d.main(argv)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "toy2d.png").stat().st_size > 10_000
    assert (tmp_path / "toy2d_hero.png").stat().st_size > 10_000
    for name in ("exact ODE", "teacher ODE", "AYF-EMD", "AYF-LMD", "consistency (EMD, s=0)", "AYF-EMD + adv"):
        assert name in metrics["results"], name
    assert set(metrics["results"]["AYF-EMD"]) == {"1", "2"}
    for per_k in metrics["results"].values():
        for met in per_k.values():
            assert math.isfinite(met["sw"]) and math.isfinite(met["err"])
    capsys.readouterr()
    toy2d.main(argv)                                                    # second run: every model cached
    out = capsys.readouterr().out
    assert out.count(": loaded ") == (5 if teacher == "exact" else 6) and "trained" not in out


def test_divergence_guard_stops_a_drifting_flow_map_and_keeps_its_last_good_weights(capsys):
    """A student whose 1-step jump lands far outside the data is stopped at the first step, with a
    message, and keeps the weights it had (the EMA of step 0); a sane student is not stopped."""
    import argparse
    args = argparse.Namespace(batch=16, distill_steps=3, ts_dist="uniform", ts_power=1.0, P_mean=-0.8,
                              P_std=1.0, p_diag=0.0, p_zero=0.1, weighting="none", warmup=1, r_max=0.99, c=0.1, distill_lr=1e-4,
                              lam_max=3.0, ema=0.9, seed=0)
    teacher = toy2d.MLP(hidden=16, depth=2)
    velocity = lambda x, t, label=None, lam=None: teacher(x, t, t, label=label)
    g = torch.Generator().manual_seed(0)
    sane = toy2d.train_flow_map(toy2d.student_from(teacher, hidden=16, depth=2), velocity, args, g, "sane", "lmd")
    assert getattr(sane, "diverged_at", None) is None
    student = toy2d.student_from(teacher, hidden=16, depth=2)
    with torch.no_grad():
        student.out[1].bias.fill_(1e4)                                  # F(z, 1, 0) ~ 1e4: f far off the data
    before = {k: v.clone() for k, v in student.state_dict().items()}
    capsys.readouterr()
    out = toy2d.train_flow_map(student, velocity, args, g, "drift", "lmd")
    assert out.diverged_at == 1 and "drift: stopped at step 1" in capsys.readouterr().out
    for k, v in out.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adv_fakes_at_adv_lam_and_the_distilled_weighting_goes_on():
    """The adversarial finetune makes its fakes at lam = --adv-lam while the EMD term keeps lam ~ U[1, 3],
    and it starts from the weighting head it is given (student lr 0 keeps it as given)."""
    import argparse
    args = argparse.Namespace(batch=16, distill_steps=3, ts_dist="uniform", ts_power=1.0, P_mean=-0.8,
                              P_std=1.0, p_diag=0.0, p_zero=0.1, weighting="adaptive", warmup=1, r_max=0.99, c=0.1, distill_lr=0.0,
                              lam_max=3.0, ema=0.9, seed=0, adv_lr=1e-3, adv_student_lr=0.0, adv_weight=0.1,
                              adv_gamma=0.1, adv_lam=2.0)
    teacher = toy2d.MLP(hidden=16, depth=2)
    velocity = lambda x, t, label=None, lam=None: teacher(x, t, t, label=label)
    student = toy2d.student_from(teacher, hidden=16, depth=2)
    lams = []
    student.register_forward_pre_hook(lambda m, args, kwargs: lams.append(kwargs["lam"].clone()), with_kwargs=True)
    head = losses.AdaptiveWeight()
    torch.nn.init.normal_(head.linear.weight)
    out = toy2d.train_flow_map(student, velocity, args, torch.Generator().manual_seed(0), "adv", "emd",
                               adv=(toy2d.Discriminator(hidden=16), 2), weight_state=head.state_dict())
    at_adv_lam = [lam for lam in lams if torch.equal(lam, torch.full_like(lam, 2.0))]
    assert len(at_adv_lam) == 3 * 2                                     # 1-step + 2-step fakes, 2 steps
    assert sum(lam.std() > 0.1 and lam.min() >= 1 and lam.max() <= 3 for lam in lams) >= 2   # EMD, lam ~ U
    for k, v in head.state_dict().items():
        assert torch.equal(out.weight_state[k], v), k


def test_emd_distillation_brings_the_one_step_jump_toward_the_exact_flow_map():
    """Learning, not just running: 300 EMD iterations with the toy's distillation settings (exact
    autoguided teacher, lr decaying from 2e-3, (t, s) squared, 25% s = t pairs) cut the 1-step jump's distance to
    the exact ODE endpoint by a quarter or more from the student's start (F = the MLP's velocity:
    one Euler step). It fails when the distillation stops moving the map (lr 0 leaves it as it was)."""
    import argparse
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size = dict(hidden=64, depth=3, x_octaves=2)
    teacher = toy2d.train_teacher(toy2d.MLP(**size), 300, 256, 2e-3, 0.1, g, "teacher", t_dist="logitnormal",
                                  P_mean=-1.0, P_std=1.4).requires_grad_(False)
    n = 1000
    label = torch.arange(n) % toy2d.NUM_CLASSES
    z = torch.randn(n, 2, generator=g)
    exact_end = toy2d.exact_flow(z, 1.0, 0.0, label, steps=20)
    cond = dict(label=toy2d.one_hot(label), lam=torch.ones(n))

    def one_step_error(net):
        with torch.no_grad():
            return (flowmap.sample_flow_map(net, z, 1, **cond) - exact_end).norm(dim=1).mean().item()

    args = argparse.Namespace(batch=128, distill_steps=300, ts_dist="uniform", ts_power=2.0, P_mean=-0.8,
                              P_std=1.0, p_diag=0.25, p_zero=0.1, weighting="adaptive", warmup=0, r_max=0.99,
                              c=0.1, distill_lr=2e-3, lam_max=3.0, ema=0.99, seed=0)
    velocity = functools.partial(flowmap.guided_velocity, toy2d.exact_teacher(), toy2d.exact_teacher(blur=2.0))
    student = toy2d.student_from(teacher, **size)
    before = one_step_error(student)
    after = one_step_error(toy2d.train_flow_map(student, velocity, args, g, "emd", "emd"))
    assert after < 0.75 * before, (before, after)
