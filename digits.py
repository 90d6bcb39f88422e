"""The whole pipeline on MNIST digits at 32x32 on a CPU, in one command (README, 'Images on a CPU: digits').

    python digits.py --data /path/to/mnist --out runs/digits

--data is a folder with the idx files (t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz, or
train-*), as dataset.py reads them. Stages, each a train_imagenet.py run (preset 'digits') or
evaluate.py, in OUT/<stage>:

    guide     the weak guide of autoguidance: the teacher's own run, stopped at 1/8 of its length
    teacher   flow matching, the preset's --kimg, going on from the guide's training state
    emd       AYF-EMD flow map, autoguided teacher
    lmd       AYF-LMD flow map, autoguided teacher
    cm        the consistency-model baseline: EMD with every s = 0 (--p-zero 1)
    adv       adversarial finetune of emd
    eval      evaluate.py: FD, precision / recall, conditional accuracy and distillation error of
              every run at 1, 2, 4, 8 steps and lam = 1, 2; OUT/eval/metrics.json and eval.png

The stages run in waves that keep every core busy with one single-threaded process each (--cores,
default all): the guide, then the teacher, as data-parallel runs (train_imagenet.py --gpus CORES on
the CPU, gloo), then EMD beside LMD, then CM beside adv, then eval (evaluate.py --jobs CORES). Small
convolutions scale better over processes than over threads, and a thread pool degrades badly when
other jobs share the cores. The guide is the teacher's own run stopped early (autoguidance's 'less
trained version of the model itself'): its learning rate and batches depend on the step alone, so
the teacher starts from a copy of the guide's training state, and its first 1/8 is not trained twice.
A rerun skips what is finished (train_imagenet.py does nothing for a finished run and
resumes an interrupted one; eval is skipped once metrics.json exists). Each stage writes its
progress and ETA (train_imagenet.py's status line) to OUT/<stage>.log, and this script prints
each stage's last line every minute, and each finished stage's wall and CPU time, which land in
OUT/timings.json. --stages picks a subset; a flag after `--` goes to every distillation
(e.g. `-- --weighting none`).

Every stage runs at batch 32 (the preset's). EMD and LMD distill at 10x the lr that train_imagenet.py
derives for ImageNet (teacher lr x 0.01, sCM's ratio for 400k iterations): the digits budget is a few
hundred iterations. The consistency model trains at 1e-4: at 1e-3 it left the teacher for textured
noise within 100 iterations, with or without the adaptive weighting (README).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("guide", "teacher", "emd", "lmd", "cm", "adv", "eval")
WAVES = (("guide",), ("teacher",), ("emd", "lmd"), ("cm", "adv"), ("eval",))   # side by side within a wave
DATA_PARALLEL = ("guide", "teacher")                                            # train_imagenet.py --gpus CORES
GUIDE_FRACTION = 1 / 8          # the guide's training length against the teacher's (autoguidance: shorter)
DISTILL_LR = 1e-3               # teacher lr 0.01 x 0.1 (see the module doc)
CM_LR = 1e-4                    # the consistency model diverges at DISTILL_LR (see the module doc)
# The teacher ODE of eval, the reference of the distillation error: Heun, 24 steps (47 NFE). On the digits
# its samples differ from 32 steps' by 0.0014 (lam 1) and 0.0028 (lam 2) mean |pixel| in [-1, 1] units,
# 3-5% of the smallest student error; 16 steps differ by 0.0041 and 0.0083.
TEACHER_STEPS = 24
# adv: D sees the images barely noised, t_D <= 0.1 (not 0.8): at 0.8 it stayed at chance on the digits,
# and at 0.3 the noise hid the 1-step samples' grainy background from it (1-step FD 101 -> 132 at lam 1;
# at 0.1: -> 79). The generator's adversarial weight 0.003: at 0.01 the lam = 1 samples improved more
# (1 step: FD 48) but the lam = 2 ones at 2-4 steps got worse (71 -> 129) (README, 'Images on a CPU').
ADV = ["--adv-t-max", "0.1", "--adv-lr", "2e-3", "--adv-weight", "0.003"]


def stage_commands(args, extra):
    """{stage: argv} for every stage, in order."""
    out, data = Path(args.out), ["--data", args.data, "--cache-dir", args.cache_dir or str(Path(args.out) / "data")]
    run = [sys.executable, "-u", str(HERE / "train_imagenet.py"), *data, "--device", "cpu", "--seed", str(args.seed)]
    teacher_kimg = ["--kimg", str(args.teacher_kimg)] if args.teacher_kimg else []
    guide_kimg = (args.teacher_kimg or train_preset()["teacher_kimg"]) * GUIDE_FRACTION
    pair = ["--teacher", str(out / "teacher"), "--guide", str(out / "guide")]

    def distill(lr, loss, name, *flags):                           # a flag after `--` wins (argparse: the last)
        return [*run, "--stage", "distill", *pair, "--lr", str(lr), "--loss", loss, *flags, "--out", str(out / name),
                *extra]

    return {
        "guide":   [*run, "--preset", "digits", "--kimg", f"{guide_kimg:g}", "--out", str(out / "guide")],
        "teacher": [*run, "--preset", "digits", *teacher_kimg, "--out", str(out / "teacher")],
        "emd":     distill(DISTILL_LR, "emd", "emd"),
        "lmd":     distill(DISTILL_LR, "lmd", "lmd"),
        "cm":      distill(CM_LR, "emd", "cm", "--p-zero", "1"),
        "adv":     [*run, "--stage", "adv", "--init", str(out / "emd"), *pair, *ADV, "--out", str(out / "adv")],
        "eval":    [sys.executable, "-u", str(HERE / "evaluate.py"), *data, *pair,
                    "--runs", *(f"{name}={out / name}" for name in ("emd", "lmd", "cm", "adv")),
                    "--steps", "1,2,4,8", "--teacher-steps", str(TEACHER_STEPS), "--num", str(args.eval_num),
                    "--out", str(out / "eval")],
    }


def teacher_from_guide(out):
    """Start the teacher's run from a copy of the guide's final training state, unless the teacher has a
    state of its own (a finished or interrupted teacher). train_imagenet.py resumes from it: the two
    runs' flags differ only in --kimg and --out, which a resumed run may change."""
    state, guide_state = out / "teacher" / "training-state.pt", out / "guide" / "training-state.pt"
    if guide_state.exists() and not state.exists():
        state.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(guide_state, state)


def train_preset():
    import train_imagenet
    return train_imagenet.PRESETS["digits"]


def start(name, command, out, threads):
    """Start one stage, its output appended to OUT/<name>.log: (process, start time, log file)."""
    log = open(out / f"{name}.log", "a")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log


def last_line(path):
    """The last status line of a stage's log (tqdm's carriage returns split lines too)."""
    text = path.read_text(errors="replace").replace("\r", "\n").strip()
    return text.splitlines()[-1] if text else ""


def run_wave(names, commands, out, cores):
    """Run a wave's stages side by side and wait for all: {name: (exit code, wall s, CPU s)}. CPU seconds
    are the stage's own and its workers' (os.wait4's rusage), whatever else runs beside it."""
    running = {name: start(name, commands[name], out, 1 if name in DATA_PARALLEL else max(1, cores // len(names)))
               for name in names}
    done, shown = {}, time.time()
    while len(done) < len(running):
        try:
            time.sleep(1)
        except KeyboardInterrupt:                                   # Ctrl-C reached the stages too: they save
            for process, _, _ in running.values():
                process.wait()
            sys.exit("digits.py: interrupted; the same command resumes every stage where it stopped")
        for name, (process, started, log) in running.items():
            pid, status, usage = (0, 0, None) if name in done else os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                done[name] = (process.returncode, time.time() - started, usage.ru_utime + usage.ru_stime)
                log.close()
        if time.time() - shown > 60:                                # progress and ETA: each stage's status line
            shown = time.time()
            for name in set(running) - set(done):
                print(f"  {name}: {last_line(out / f'{name}.log')}", flush=True)
    return done


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
    p.add_argument("--cores", default=os.cpu_count(), type=int, help="processes at a time (all cores)")
    p.add_argument("--seed", default=0, type=int)
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    if not Path(args.data).exists():
        p.error(f"--data {args.data} does not exist; pass the folder that holds the MNIST idx files")
    if args.cores < 1:
        p.error(f"--cores {args.cores}: need at least 1")

    commands = stage_commands(args, extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    begin, worked = time.time(), set()
    if args.cores > 1:                                              # the guide and teacher: data-parallel
        for name in DATA_PARALLEL:
            commands[name] += ["--gpus", str(args.cores)]
    commands["eval"] += ["--jobs", str(args.cores)]
    if "eval" in stages and (out / "eval" / "metrics.json").exists():
        print(f"{out / 'eval' / 'metrics.json'} exists; eval has nothing to do (delete it to evaluate again)")
        stages.remove("eval")
    for wave in ([name for name in wave if name in stages] for wave in WAVES):
        if not wave:
            continue
        print(f"\n=== digits.py: {' and '.join(wave)}  (elapsed {time.time() - begin:.0f} s; logs in {out}/<stage>.log)")
        if "teacher" in wave:
            teacher_from_guide(out)
        for name in wave:
            print(" ".join(commands[name]), flush=True)
        for name, (code, wall, cpu) in run_wave(wave, commands, out, args.cores).items():
            if code != 0:
                print(f"digits.py: stage {name} failed (exit code {code}); the end of {out / f'{name}.log'}:\n"
                      f"  {last_line(out / f'{name}.log')}\nfix it and rerun the same command, finished stages are "
                      f"skipped", file=sys.stderr)
                sys.exit(code)
            if wall > 30:   # a skipped stage takes a few seconds: keep the time of the run that did the work
                timings[name] = dict(wall_sec=round(wall, 1), cpu_sec=round(cpu, 1))
                worked.add(name)
            print(f"=== {name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        if worked == set(STAGES):                                   # a whole chain in this command
            timings["chain"] = dict(wall_sec=round(time.time() - begin, 1), cores=args.cores)
        timings_path.write_text(json.dumps(timings, indent=1))      # after every wave: kept if a later one stops
    print(f"\ndigits.py: done in {time.time() - begin:.0f} s; metrics in {out / 'eval' / 'metrics.json'}")


if __name__ == "__main__":
    main()
