"""Course exercises: blank an answer in your copy, derive it, implement it, check it.

    python -m exercises                 list the exercises
    python -m exercises N               blank exercise N: the function body, its docstring, and the
                                        answer-bearing text of README.md and docs/method.md
    python -m exercises N --check       run every test that grades exercise N (= python -m pytest -m ex_NAME)
    python -m exercises --restore       put back everything that was blanked (the originals are kept
                                        in .exercises/, which git ignores); `git checkout .` works too

Blanking a function keeps its signature and replaces the rest with a NotImplementedError, so the
graded tests fail until you write it. Do one exercise at a time, in a copy you have not read the
answers of (docs/method.md's marked sections, the blanked docstrings, git history).
"""
import argparse
import ast
import dataclasses
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKUP = ROOT / ".exercises"


@dataclasses.dataclass
class Exercise:
    name: str                   # pytest marker ex_<name>, and the name of the answer blocks in the docs
    title: str
    functions: list             # (file, function name, the task) whose docstring and body are blanked
    readme_rows: list = dataclasses.field(default_factory=list)   # README lines holding the answer


SURROGATE = """
Per-sample losses (N,) whose gradient in the network's weights, times (t - s)^2 D (D: the dimensions
of a sample, the loss being a mean over them), is the eps -> 0 limit of grad L_eps / eps when c is
None. c normalizes the direction per sample: divided by (its norm + c). Take F_theta and its
derivative from one call of jvp.value_and_jvp(..., method=jvp_method); velocity(x, t, **cond) is
the teacher."""
EXERCISES = {
    1: Exercise("lmd", "Derive and implement the LMD objective", [("losses.py", "lmd_loss", (
        "AYF-LMD (AYF Sec. 3.1, Lagrangian theorem); the discrete objective L_eps is in docs/method.md §4.\n"
        + SURROGATE + "\ndata_range (lo, hi), when given: pass the teacher's velocity at the predicted point through\n"
        "flowmap.velocity_in_range (docs/method.md §4, 'The teacher at the predicted point')."))], ["`dF_ds` in `lmd_loss`", "| `h = df/ds"]),
    2: Exercise("emd", "Derive the EMD surrogate", [("losses.py", "emd_loss", (
        "AYF-EMD (AYF Sec. 3.1, Eulerian theorem); the discrete objective L_eps is in docs/method.md §3.\n"
        + SURROGATE + "\nr (tangent warmup) multiplies the term that carries dF/dt."))],
        ["`dF_dt` in `emd_loss`"]),
    3: Exercise("gamma", "gamma-sampling for the linear path", [("flowmap.py", "sample_gamma", (
        "gamma-sampling (CTM), linear-path form (docs/method.md §8). From t to s: jump with the flow map\n"
        "to s' <= s, rescale, add gamma s z with z = noise(x), so that x_s has the marginal of time s.\n"
        "No noise at the last step. gamma = 0 must be sample_flow_map, gamma = 1 sample_consistency."))]),
    4: Exercise("guidance", "Guidance", [("flowmap.py", "guided_velocity", (
        "Guided teacher velocity (Autoguidance, Karras et al. 2024, Eq. 1; docs/method.md §6): from\n"
        "weak(x, t, **cond) through velocity(x, t, **cond), strength lam (None, a float or a per-sample\n"
        "(N,) tensor). Never call weak when every lam is 1; lam != 1 with weak=None is a ValueError."))]),
    5: Exercise("theorem", "AYF Theorem 3.1 by hand", [("tests/test_flowmap.py", "cm_sample_std", (
        "sigma_N of consistency multistep sampling (uniform grid 1 -> 0, N = steps) with the linear\n"
        "consistency model f(x, t, 0) = k(t) x, starting from x_1 ~ N(0, 1). Derive the recursion."))]),
    6: Exercise("adversarial", "The adversarial losses", [
        ("losses.py", "rpgan_d_loss", "Discriminator loss of the relativistic pairing GAN (R3GAN), per pair (N,)."),
        ("losses.py", "rpgan_g_loss", "Generator loss of the relativistic pairing GAN (R3GAN), per pair (N,)."),
        ("losses.py", "grad_penalty", "R1 (x real) or R2 (x fake) penalty per sample (N,); the caller weights it\n"
                                      "by gamma / 2. R1 / R2 train D.")]),
}
ANSWER_BLOCK = re.compile(r"<!-- answer ([\w ]+) -->\n.*?<!-- /answer -->\n", re.S)


def fail(message):
    print(f"exercises: {message}", file=sys.stderr)
    sys.exit(2)


def blank_function(source, name, number, task):
    """source with the docstring and body of top-level function `name` replaced by the task and a stub."""
    node = next((n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        raise LookupError(name)
    lines = source.splitlines(keepends=True)
    first, last = node.body[0].lineno - 1, node.end_lineno                # 0-based, end exclusive
    indent = re.match(r"\s*", lines[first]).group(0)
    stub = (f'{indent}"""Exercise {number} (README, Course exercises).\n\n{textwrap.indent(task, indent)}\n{indent}"""\n'
            f'{indent}raise NotImplementedError("exercise {number}: yours to derive; python -m exercises {number} --check")\n')
    return "".join(lines[:first]) + stub + "".join(lines[last:])


def blank_docs(text, exercise, number):
    """Remove the answer blocks named after the exercise, and the README rows that give it away."""
    def replace(m):
        if exercise.name not in m.group(1).split():
            return m.group(0)
        return f"<!-- answer {m.group(1)} -->\n*(Hidden for exercise {number}; `python -m exercises --restore` brings it back.)*\n\n<!-- /answer -->\n"
    text = ANSWER_BLOCK.sub(replace, text)
    rows = [f"| *(hidden for exercise {number})* | | | |" if any(k in line for k in exercise.readme_rows) else line
            for line in text.split("\n")]
    return "\n".join(rows)


def blank(number):
    exercise = EXERCISES[number]
    if BACKUP.exists():
        fail(f"an exercise is already blanked in this copy ({BACKUP.name}/ exists); "
             "run python -m exercises --restore first")
    edits = {}
    for path, name, task in exercise.functions:
        source = edits.get(path) or (ROOT / path).read_text(encoding="utf-8")
        try:
            edits[path] = blank_function(source, name, number, task)
        except LookupError:
            fail(f"{path} has no function {name}: was it renamed? restore it (git checkout {path}) and retry")
    for path in ("README.md", "docs/method.md"):
        text = (ROOT / path).read_text(encoding="utf-8")
        if blank_docs(text, exercise, number) != text:
            edits[path] = blank_docs(text, exercise, number)
    for path, text in edits.items():
        (BACKUP / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, BACKUP / path)
        (ROOT / path).write_text(text, encoding="utf-8")
    print(f"exercise {number} ({exercise.title}): blanked in {', '.join(sorted(edits))}.")
    print(f"derive, implement, then: python -m exercises {number} --check   (undo: python -m exercises --restore)")


def restore():
    if not BACKUP.exists():
        fail("nothing to restore: no exercise is blanked in this copy")
    for saved in sorted(p for p in BACKUP.rglob("*") if p.is_file()):
        shutil.copy2(saved, ROOT / saved.relative_to(BACKUP))
        print(f"restored {saved.relative_to(BACKUP)}")
    shutil.rmtree(BACKUP)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m exercises", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("number", nargs="?", type=int, help="the exercise, as numbered in README.md")
    parser.add_argument("--check", action="store_true", help="run every test that grades it")
    parser.add_argument("--restore", action="store_true", help="put back what was blanked")
    args = parser.parse_args(argv)
    if args.restore:
        return restore()
    if args.number is None:
        for number, exercise in EXERCISES.items():
            print(f"{number}. {exercise.title}: python -m pytest -m ex_{exercise.name}")
        return
    if args.number not in EXERCISES:
        fail(f"no exercise {args.number}; choose one of {', '.join(map(str, EXERCISES))}")
    if args.check:                                                      # only the files that hold its tests
        marker = f"ex_{EXERCISES[args.number].name}"
        files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
                 if f"mark.{marker}" in p.read_text(encoding="utf-8")]
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-m", marker, *files], cwd=ROOT))
    blank(args.number)


if __name__ == "__main__":
    main()
