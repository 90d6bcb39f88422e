"""The whole pipeline on MNIST digits at 32x32 on a CPU, in one command (README, 'Images on a CPU: digits').

    python digits.py --data /path/to/mnist --out runs/digits

--data is a folder with the idx files (t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, or
train-*), as dataset.py reads them. Stages, each a train_imagenet.py run (preset 'digits') or
evaluate.py, in OUT/<stage>:

    teacher   flow matching, the preset's --kimg
    guide     the weak guide of autoguidance: the same network trained 1/8 as long
    emd       AYF-EMD flow map, autoguided teacher
    lmd       AYF-LMD flow map, autoguided teacher
    cm        the consistency-model baseline: EMD with every s = 0 (--p-zero 1)
    adv       adversarial finetune of emd
    eval      evaluate.py: FD, precision / recall, conditional accuracy and distillation error of
              every run at 1, 2, 4, 8 steps and lam = 1, 2; OUT/eval/metrics.json and eval.png

A rerun skips what is finished (train_imagenet.py does nothing for a finished run and resumes an
interrupted one; eval is skipped once metrics.json exists). Each stage prints its own progress and
ETA (the status line of train_imagenet.py); this script prints each stage's wall and CPU time,
which lands in OUT/timings.json. --stages picks a subset; a flag after `--` goes to every
distillation (e.g. `-- --weighting adaptive`).

Distillation and adv run at batch 32 (the teacher: 64) and the distillation at 10x the lr that
train_imagenet.py derives for ImageNet (teacher lr x 0.01, sCM's ratio for 400k iterations): the
digits budget is 100 distillation iterations.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("teacher", "guide", "emd", "lmd", "cm", "adv", "eval")
GUIDE_FRACTION = 1 / 8          # the guide's training length against the teacher's (autoguidance: shorter)
DISTILL_LR = 1e-3               # teacher lr 0.01 x 0.1 (see the module doc)
DISTILL_BATCH = 32              # half the teacher's: twice the iterations for the same images


def stage_commands(args, extra):
    """{stage: argv} for every stage, in order."""
    out, data = Path(args.out), ["--data", args.data, "--cache-dir", args.cache_dir or str(Path(args.out) / "data")]
    run = [sys.executable, "-u", str(HERE / "train_imagenet.py"), *data, "--device", "cpu", "--seed", str(args.seed)]
    teacher_kimg = ["--kimg", str(args.teacher_kimg)] if args.teacher_kimg else []
    guide_kimg = (args.teacher_kimg or train_preset()["teacher_kimg"]) * GUIDE_FRACTION
    pair = ["--teacher", str(out / "teacher"), "--guide", str(out / "guide")]
    distill = [*run, "--stage", "distill", *pair, "--lr", str(DISTILL_LR), "--batch", str(DISTILL_BATCH), *extra]
    return {
        "teacher": [*run, "--preset", "digits", *teacher_kimg, "--out", str(out / "teacher")],
        "guide":   [*run, "--preset", "digits", "--kimg", f"{guide_kimg:g}", "--out", str(out / "guide")],
        "emd":     [*distill, "--loss", "emd", "--out", str(out / "emd")],
        "lmd":     [*distill, "--loss", "lmd", "--out", str(out / "lmd")],
        "cm":      [*distill, "--loss", "emd", "--p-zero", "1", "--out", str(out / "cm")],
        "adv":     [*run, "--stage", "adv", "--init", str(out / "emd"), *pair, "--batch", str(DISTILL_BATCH),
                    "--out", str(out / "adv")],
        "eval":    [sys.executable, "-u", str(HERE / "evaluate.py"), *data, *pair,
                    "--runs", *(f"{name}={out / name}" for name in ("emd", "lmd", "cm", "adv")),
                    "--steps", "1,2,4,8", "--num", str(args.eval_num), "--out", str(out / "eval")],
    }


def train_preset():
    import train_imagenet
    return train_imagenet.PRESETS["digits"]


def cpu_seconds():
    """User + system CPU time of the finished child processes so far (load-independent cost)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of MNIST idx files (or the images file)")
    p.add_argument("--out", default="runs/digits", help="one run folder per stage in here")
    p.add_argument("--cache-dir", default=None, help="dataset cache (default OUT/data)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--teacher-kimg", default=None, type=float, help="teacher length (the preset's by default)")
    p.add_argument("--eval-num", default=500, type=int, help="samples per run, step count and lam")
    p.add_argument("--seed", default=0, type=int)
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    if not Path(args.data).exists():
        p.error(f"--data {args.data} does not exist; pass the folder that holds the MNIST idx files")

    commands = stage_commands(args, extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    start = time.time()
    for k, name in enumerate(s for s in STAGES if s in stages):
        print(f"\n=== digits.py stage {k + 1}/{len(stages)}: {name}  (elapsed {time.time() - start:.0f} s)\n"
              + " ".join(commands[name]), flush=True)
        if name == "eval" and (out / "eval" / "metrics.json").exists():
            print(f"{out / 'eval' / 'metrics.json'} exists; nothing to do (delete it to evaluate again)")
            continue
        wall, cpu = time.time(), cpu_seconds()
        result = subprocess.run(commands[name], cwd=HERE)
        if result.returncode != 0:
            print(f"digits.py: stage {name} failed (exit code {result.returncode}); fix it and rerun the "
                  f"same command, finished stages are skipped", file=sys.stderr)
            sys.exit(result.returncode)
        wall, cpu = time.time() - wall, cpu_seconds() - cpu
        if wall > 30:       # a skipped stage takes a few seconds: keep the time of the run that did the work
            timings[name] = dict(wall_sec=round(wall, 1), cpu_sec=round(cpu, 1))
            timings_path.write_text(json.dumps(timings, indent=1))
        print(f"=== {name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    print(f"\ndigits.py: done in {time.time() - start:.0f} s; metrics in {out / 'eval' / 'metrics.json'}")


if __name__ == "__main__":
    main()
