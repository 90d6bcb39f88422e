"""evaluate.py: the classifier metric, on tiny synthetic 16x16 runs trained by train_imagenet.main.

Each test computes a metric a second, independent way: the classifier's features by batch and
alone, FD against its closed form for a shift, conditional accuracy on images built to be classified
a known way, the distillation error by hand and from the teacher's ODE integrated directly, and the
command line's numbers against samplers called by the test.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image

import dataset
import evaluate
import fid
import sample
import train_imagenet as ti
from flowmap import as_velocity, guided_velocity, sample_ode

R, K = 16, 10                                                           # resolution and classes of the runs


@pytest.fixture(scope="module")
def synthetic():
    return dataset.load_dataset("synthetic", resolution=R)


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory, synthetic):
    """A classifier trained on synthetic 16x16 for 6 kimg (a few seconds), saved as evaluate.py saves it."""
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    evaluate.load_or_train_classifier(path, "synthetic", synthetic, R, 6, "cpu")
    return path


def load_classifier(path):
    saved = torch.load(path, weights_only=True)
    clf = evaluate.Classifier(saved["info"]["num_classes"], saved["info"]["resolution"], saved["info"]["width"])
    clf.load_state_dict(saved["state_dict"])
    return clf.eval(), saved["info"]


# ----------------------------------------------------------------------------------------------
# The classifier and its features.

def test_classifier_learns_and_reports_its_heldout_accuracy(classifier_file, synthetic):
    """Held-out accuracy far above chance (0.1), and equal to a recount through the plain forward."""
    clf, info = load_classifier(classifier_file)
    _, held = evaluate.split(len(synthetic), 0.1)
    assert info["num_heldout"] == len(held) == 51 and info["num_train"] == 512 - 51
    x, onehot = dataset.get_batch(synthetic, held, "cpu")
    with torch.no_grad():
        recount = (clf(x).argmax(1) == onehot.argmax(1)).double().mean().item()
    assert info["heldout_accuracy"] == pytest.approx(recount)
    assert recount > 0.8


def test_features_do_not_depend_on_the_batch(classifier_file, synthetic):
    clf, _ = load_classifier(classifier_file)
    images = synthetic.images[:20]
    feats, pred = evaluate.classify(clf, images)
    feats_small, pred_small = evaluate.classify(clf, images, batch=3)
    alone = evaluate.classify(clf, images[7:8])[0]
    np.testing.assert_allclose(feats_small, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone[0], feats[7], rtol=1e-5, atol=1e-6)
    assert (pred == pred_small).all() and feats.shape == (20, 64)


def test_fd_of_identical_sets_is_zero_and_of_a_shift_its_norm(classifier_file, synthetic):
    """Same images: FD 0, precision = recall = 1. Features shifted by c: covariance unchanged, so
    FD = ||c||^2 exactly (closed form), while the FD of fid.py on np.cov statistics agrees."""
    clf, _ = load_classifier(classifier_file)
    feats = evaluate.classify(clf, synthetic.images[:100])[0]          # (100, 64)
    same = evaluate.feature_metrics(feats, feats, fid.feature_stats(feats))
    assert abs(same["fd"]) < 1e-8 and same["precision"] == same["recall"] == 1

    c = np.random.default_rng(0).normal(size=feats.shape[1]) * 0.1
    shifted = evaluate.feature_metrics(feats + c, feats, fid.feature_stats(feats))
    assert shifted["fd"] == pytest.approx((c ** 2).sum(), rel=1e-6)
    other = evaluate.classify(clf, synthetic.images[100:200])[0]
    direct = fid.frechet_distance(other.mean(0), np.cov(other, rowvar=False), feats.mean(0), np.cov(feats, rowvar=False))
    assert evaluate.feature_metrics(other, feats, fid.feature_stats(feats))["fd"] == pytest.approx(direct, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Conditional accuracy and distillation error.

class BrightestChannel(torch.nn.Module):
    """A classifier built by hand: features = channel means (N, 3), class = the brightest channel."""
    def features(self, x):
        return x.mean(dim=(2, 3))

    def head(self, f):
        return f


def test_conditional_accuracy_on_constructed_images():
    """Image i is pure channel i % 3; 7 of the 10 labels name that channel, 3 do not: 0.7."""
    images = np.zeros((10, 4, 4, 3), dtype=np.uint8)
    for i in range(10):
        images[i, :, :, i % 3] = 255
    labels = np.arange(10) % 3
    labels[[1, 4, 8]] = (labels[[1, 4, 8]] + 1) % 3                    # three wrong labels
    real = np.random.default_rng(0).normal(size=(10, 3))
    row = evaluate.score(images, labels, BrightestChannel(), real, fid.feature_stats(real), None, "cpu")
    assert row["cond_acc"] == pytest.approx(0.7) and row["distill_err"] is None


def test_distillation_error_by_hand():
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0, 0], b[1, 2, 3, 1] = 255, 10
    assert evaluate.distillation_error(a, b) == pytest.approx((255 + 10) / 127.5 / a.size)
    x, y = (torch.rand(3, 5, 5, 3) * 255).round().to(torch.uint8).numpy(), np.full((3, 5, 5, 3), 128, np.uint8)
    per_image = [np.abs(x[i] / 127.5 - 1 - (y[i] / 127.5 - 1)).mean() for i in range(3)]   # in [-1, 1] units
    assert evaluate.distillation_error(x, y) == pytest.approx(np.mean(per_image))


def test_distillation_error_of_the_teacher_itself_is_zero(runs):
    teacher, config = ti.load_snapshot(runs / "teacher")
    sampler, _ = sample.ode_sampler(teacher, 3, "heun")
    seeds = list(range(6))
    images, _ = sample.generate(sampler, seeds, None, config, 6, "cpu")
    again, _ = sample.generate(sampler, seeds, None, config, 4, "cpu")
    assert evaluate.distillation_error(again, images) < 1e-3          # a pixel may round either way
    student, _ = sample.generate(sample.flow_map_sampler(ti.load_snapshot(runs / "emd")[0], 1, 0, 1.0)[0],
                                 seeds, None, config, 6, "cpu")
    assert evaluate.distillation_error(student, images) > 0.01


# ----------------------------------------------------------------------------------------------
# The command line.

def test_cli_end_to_end(runs, classifier_file, tmp_path):
    """Rows for every run, lam and step count; a student without lam input is skipped at lam 2; cm is
    gamma-sampled; the emd row at lam 2, 2 steps matches the test's own teacher ODE and classifier."""
    out = tmp_path / "eval"
    argv = ["--data", "synthetic", "--teacher", str(runs / "teacher"), "--guide", str(runs / "guide"),
            "--runs", f"emd={runs / 'emd'}", f"cm={runs / 'emd'}", f"plain={runs / 'plain'}:gamma=0.5",
            "--steps", "1,2", "--num", "16", "--teacher-steps", "2", "--classifier", str(classifier_file),
            "--grid-num", "4", "--device", "cpu", "--out", str(out)]
    metrics = evaluate.main(argv)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert Image.open(out / "eval.png").size[0] > 500
    rows = {(r["run"], r["lam"], r["steps"]): r for r in metrics["rows"]}
    assert len(rows) == 1 + 2 + 4 + 4 + 2 and len(metrics["skipped"]) == 1
    assert metrics["runs"]["cm"]["gamma"] == 1 and metrics["runs"]["plain"]["gamma"] == 0.5
    assert rows["cm", 1, 1] | {"run": "emd", "seconds": 0} == rows["emd", 1, 1] | {"seconds": 0}   # 1 step: no re-noising
    assert rows["cm", 1, 2]["distill_err"] != rows["emd", 1, 2]["distill_err"]
    rerun = evaluate.main(argv)                                         # reuses teacher-lam*.npz
    assert [r | {"seconds": 0} for r in rerun["rows"]] == [r | {"seconds": 0} for r in metrics["rows"]]
    assert sorted(p.name for p in out.glob("teacher-*")) == ["teacher-lam1.npz", "teacher-lam2.npz"]

    # The emd row at lam 2, 2 steps, recomputed: the teacher's guided ODE integrated here with flowmap.
    seeds = list(range(16))
    z, label, _ = sample.seed_inputs(seeds, range(16), None, K, R)
    onehot = nnf.one_hot(label, K).float()
    teacher, weak = ti.load_snapshot(runs / "teacher")[0], ti.load_snapshot(runs / "guide")[0]
    velocity = lambda x, t, **c: guided_velocity(as_velocity(teacher), as_velocity(weak), x, t, lam=2.0, **c)
    reference = sample.to_uint8(sample_ode(velocity, z, 2, "heun", label=onehot)).numpy()
    emd, config = ti.load_snapshot(runs / "emd")
    images, labels = sample.generate(sample.flow_map_sampler(emd, 2, 0, 2.0)[0], seeds, None, config, 16, "cpu")
    assert (labels == label.numpy()).all()
    assert rows["emd", 2, 2]["distill_err"] == pytest.approx(evaluate.distillation_error(images, reference), abs=1e-3)
    clf, _ = load_classifier(classifier_file)
    with torch.no_grad():
        predicted = clf(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1).argmax(1).numpy()
    assert rows["emd", 2, 2]["cond_acc"] == pytest.approx((predicted == labels).mean())



def test_jobs_in_processes_give_the_rows_of_one_process(runs, classifier_file, tmp_path):
    """--jobs 2 (spawned processes, one thread each) and --jobs 1 draw the same samples: every row agrees
    but for its seconds (a pixel may round the other way under another thread count)."""
    argv = ["--data", "synthetic", "--teacher", str(runs / "teacher"), "--guide", str(runs / "guide"),
            "--runs", f"emd={runs / 'emd'}", "--steps", "1,2", "--num", "16", "--teacher-steps", "2",
            "--classifier", str(classifier_file), "--grid-num", "4", "--device", "cpu"]
    one = evaluate.main(argv + ["--out", str(tmp_path / "one")])["rows"]
    two = evaluate.main(argv + ["--out", str(tmp_path / "two"), "--jobs", "2"])["rows"]
    assert [(r["run"], r["lam"], r["steps"]) for r in one] == [(r["run"], r["lam"], r["steps"]) for r in two]
    for a, b in zip(one, two):
        for key in ("fd", "precision", "recall", "cond_acc", "distill_err"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-3), (a["run"], a["lam"], a["steps"], key)

def image_folder(root, num_classes):
    for k in range(num_classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((R, R, 3), 40 * k + i, np.uint8)).save(root / f"c{k}" / f"{i}.png")
    return root


@pytest.mark.parametrize("problem", ["missing run", "data classes", "classifier classes", "classifier channels",
                                     "bad spec"])
def test_bad_input_is_one_line_and_exit_2(runs, classifier_file, tmp_path, capsys, problem):
    argv = ["--data", "synthetic", "--teacher", str(runs / "teacher"), "--guide", str(runs / "guide"),
            "--runs", f"emd={runs / 'emd'}", "--num", "8", "--out", str(tmp_path / "eval")]
    if problem == "missing run":
        argv[7] = f"emd={runs / 'nothing-here'}"
    elif problem == "data classes":
        argv[1] = str(image_folder(tmp_path / "three", 3))
    elif problem in ("classifier classes", "classifier channels"):
        saved = torch.load(classifier_file, weights_only=True)
        saved["info"]["num_classes" if problem == "classifier classes" else "channels"] = 1
        torch.save(saved, tmp_path / "other.pt")
        argv += ["--classifier", str(tmp_path / "other.pt")]
    else:
        argv[7] = "emd"
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]   # not the progress bars
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith("evaluate.py: error:")
    assert not (tmp_path / "eval" / "metrics.json").exists()
