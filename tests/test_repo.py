"""The repository stands alone: no file of the project points outside it, and every section of the
method notes that the code cites (`docs/method.md §N`) exists."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"

# Paths that only exist on the machine where the project was written. This file spells them out
# as patterns, so it is the one file not scanned for them.
OUTSIDE = [
    (re.compile(r"\.\./+shared|(?<![\w.-])shared/"), "a 'shared/' folder next to the repository"),
    (re.compile(r"(?<![\w.])/work/"), "an absolute /work path"),
    (re.compile(r"(?<![\w.])/(home|Users)/\w"), "a home directory"),
    (re.compile(r"(?<![\w.])\.\./\.\./"), "a path two levels above a file"),
]
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
CITATION = re.compile(r"docs/method\.md((?:(?:\s*,\s*|\s+and\s+|\s*)§\d+(?:\s*[-–]\s*\d+)?)+)")


def project_files():
    """The tracked files (git ls-files), or every file but caches and hidden folders outside git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        paths = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*")
                 if not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(ROOT).parts)]
    paths.append(METHOD)                                                # also before it is committed
    return sorted({p for p in paths if p.is_file()})


def text_files():
    for path in project_files():
        data = path.read_bytes()
        if b"\0" in data:                                               # images, checkpoints
            continue
        try:
            yield path, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def method_sections():
    return {int(n) for n in re.findall(r"^## (\d+)\. ", METHOD.read_text(encoding="utf-8"), re.M)}


def cited_sections(text):
    """[(line number, section)] for every `docs/method.md §N`, `§N-M`, `§N, §M` in text."""
    cited = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        for a, b in re.findall(r"§(\d+)(?:\s*[-–]\s*(\d+))?", m.group(1)):
            cited += [(line, n) for n in range(int(a), int(b or a) + 1)]
    return cited


def test_no_file_refers_to_a_path_outside_the_repository():
    bad = []
    for path, text in text_files():
        if path == pathlib.Path(__file__).resolve():
            continue
        for pattern, what in OUTSIDE:
            for m in pattern.finditer(text):
                bad.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
        if path.suffix == ".md":
            for m in MD_LINK.finditer(text):
                target = m.group(1).split("#")[0]
                if not target or re.match(r"[a-z]+:", target):              # anchors, http(s), mailto
                    continue
                resolved = (path.parent / target).resolve()
                if not resolved.is_relative_to(ROOT) or not resolved.exists():
                    bad.append(f"{path.relative_to(ROOT)}: link to {target!r}, not a file of the repository")
    assert not bad, "the repository must stand alone; fix these references:\n" + "\n".join(bad)


def test_every_cited_section_of_the_method_notes_exists():
    sections = method_sections()
    assert sections == set(range(1, 12)), f"docs/method.md should have sections §1..§11, has {sorted(sections)}"
    bad, n_cited = [], 0
    for path, text in text_files():
        if path == pathlib.Path(__file__).resolve():
            continue
        for m in re.finditer(r"(?<!docs/)method\.md", text):
            bad.append(f"{path.relative_to(ROOT)}: cite the notes as docs/method.md, not {text[m.start():m.end()]!r}")
        for line, n in cited_sections(text):
            n_cited += 1
            if n not in sections:
                bad.append(f"{path.relative_to(ROOT)}:{line}: docs/method.md §{n} does not exist")
        if path == METHOD:                                              # the notes' own cross-references
            bad += [f"docs/method.md: §{n} does not exist" for n in map(int, re.findall(r"§(\d+)", text))
                    if n not in sections]
    assert not bad, "\n".join(bad)
    assert n_cited > 20, f"found only {n_cited} citations of docs/method.md: is the pattern still right?"


def test_the_citation_pattern():
    text = "see docs/method.md §3-5 and docs/method.md §11, §2\nand docs/method.md §7"
    assert cited_sections(text) == [(1, 3), (1, 4), (1, 5), (1, 11), (1, 2), (2, 7)]


def test_every_exercise_can_be_blanked_and_has_graded_tests():
    """python -m exercises N finds its functions and answer blocks, and its marker selects tests."""
    from exercises.__main__ import EXERCISES, blank_docs, blank_function
    markers = (ROOT / "pytest.ini").read_text()
    tests = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    docs = {p: (ROOT / p).read_text(encoding="utf-8") for p in ("README.md", "docs/method.md")}
    for number, exercise in EXERCISES.items():
        assert f"ex_{exercise.name}:" in markers and f"mark.ex_{exercise.name}" in tests, exercise.name
        for path, name, task in exercise.functions:
            blanked = blank_function((ROOT / path).read_text(encoding="utf-8"), name, number, task)
            namespace = {}
            exec(compile(blanked, path, "exec"), namespace)                 # still valid Python
            assert "NotImplementedError" in blanked and namespace[name].__doc__.startswith(f"Exercise {number} ")
        for path, text in docs.items():
            after = blank_docs(text, exercise, number)
            assert after.count("<!-- answer") == text.count("<!-- answer")  # blocks stay, emptied
            for row in exercise.readme_rows:
                assert row not in after, f"{path}: {row!r} survives blanking exercise {number}"
    hidden = {name for p, text in docs.items() for names in re.findall(r"<!-- answer ([\w ]+) -->", text)
              for name in names.split()}
    assert hidden <= {e.name for e in EXERCISES.values()}, "an answer block names no exercise"
    assert {"emd", "lmd", "gamma", "guidance", "adversarial"} <= hidden
