from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    """`import histoseq` loads neither torch, lightning nor spatialdata: they come with the functions that use them."""
    heavy = "('torch', 'lightning', 'spatialdata', 'scanpy')"
    code = f"import sys, histoseq; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_namespaces_load_on_first_use():
    import histoseq as hs

    assert {"io", "datasets", "pp", "tl", "pl"} <= set(dir(hs))
    assert callable(hs.pp.extract_patches)
    assert callable(hs.io.read_legacy_st)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = hs.nope


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    commands = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(commands) == 2
    assert "histoseq demo" in commands[0]
    assert "pytest" in commands[1]
    assert "-c constraints.txt" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = commands[1].split("&&")
    assert install.strip().replace("pip install", "pip install -q") in ci
    assert test.strip() in ci
    assert "torch==" in (ROOT / "constraints.txt").read_text()


def test_torch_requirement_stays_a_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.3"' in text
