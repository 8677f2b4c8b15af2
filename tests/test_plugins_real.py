"""
A third-party backend, installed and uninstalled with pip, found by a real
``twistd cc50`` with no edit of cc50tw: the example in examples/echo-backend.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import StartCC50
from tests.helpers import REPO_ROOT, cc50_command, twistd_command

ECHO = REPO_ROOT / "examples" / "echo-backend"


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def cc50_help() -> str:
    result = subprocess.run(twistd_command("cc50", "--help"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def echo_installed() -> object:
    installed = pip("install", "--no-deps", "--no-build-isolation", str(ECHO))
    if installed.returncode != 0:
        # Without setuptools in the environment, let pip build in isolation.
        installed = pip("install", "--no-deps", str(ECHO))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield
    pip("uninstall", "-y", "cc50-echo")
    remove_stray_plugin_directory()


def remove_stray_plugin_directory() -> None:
    """
    pip removes the example's plugin module but not the ``dropin.cache`` that
    twistd's plugin scan wrote beside it.  Where cc50tw itself is installed
    in site-packages that cache is its own; beside an editable install (no
    ``cc50tw/__init__.py`` there) the directory left behind is a namespace
    package named ``cc50tw`` that shadows the real one in later runs (trial:
    "cannot import name '__version__' from 'cc50tw' (unknown location)").
    """
    stray = Path(sysconfig.get_paths()["purelib"]) / "cc50tw"
    if not stray.is_dir() or (stray / "__init__.py").exists():
        return
    plugins = stray / "plugins"
    leftovers = {entry.name for entry in plugins.iterdir()} if plugins.is_dir() else set()
    if {entry.name for entry in stray.iterdir()} <= {"plugins"} and leftovers <= {"dropin.cache", "__pycache__"}:
        shutil.rmtree(stray)


def test_installed_plugin_is_listed_served_and_removed(echo_installed: object, cc50_server: StartCC50) -> None:
    help_text = cc50_help()
    assert "echo" in help_text and "example third-party plugin" in help_text
    assert "--echo-reverse" in help_text

    server = cc50_server("--backend=echo", "--echo-reverse=yes")
    result = subprocess.run(
        cc50_command("infer", "--server", server.address, "--prompt", "one two three", "--max-tokens", "10"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "three two one"
    assert "tokens=3" in result.stderr

    bad = subprocess.run(
        twistd_command("-n", "--pidfile=", "cc50", "--backend=echo", "--echo-reverse=maybe"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "echo-reverse" in bad.stdout + bad.stderr and "yes or no" in bad.stdout + bad.stderr

    uninstalled = pip("uninstall", "-y", "cc50-echo")
    assert uninstalled.returncode == 0, uninstalled.stderr
    help_text = cc50_help()
    assert "--echo-reverse" not in help_text
    missing = subprocess.run(
        twistd_command("-n", "--pidfile=", "cc50", "--backend=echo"), capture_output=True, text=True, timeout=60
    )
    assert missing.returncode != 0
    assert "unknown backend 'echo'" in missing.stdout + missing.stderr
