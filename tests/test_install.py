"""What a fresh install needs: numpy is a real dependency (safetensors hands tensors to torch through
it), and `asft demo` / `asft finetune` without their extras say which extra to install."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import setuptools
import torch

from asft_optim import Anchors

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_numpy_is_needed_and_declared(tmp_path, monkeypatch):
    path = Anchors.from_tensors({"w": torch.ones(3)}).save(tmp_path / "d.safetensors")
    # without numpy, the README's first line fails (what a user saw with numpy missing) ...
    run = _python(f"import sys; sys.modules['numpy'] = None\nfrom asft_optim import Anchors\nAnchors.load({str(path)!r})")
    assert run.returncode != 0 and "Numpy is not available" in run.stderr
    # ... so setup.py installs it with the package, not only with an extra
    seen: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    assert any(r.split(">")[0] == "numpy" for r in seen["install_requires"])


def test_commands_without_their_extras_name_the_extra(tmp_path):
    """`asft demo` / `asft finetune` with transformers, or peft and matplotlib, not importable (one
    subprocess, so that nothing of them is imported yet)."""
    cases = [(["transformers"], ["demo", "--out", str(tmp_path)]),
             (["peft", "matplotlib"], ["finetune", "--aligned", str(tmp_path), "--data", str(tmp_path / "x.jsonl")])]
    run = _python(
        "import contextlib, io, json, sys\nfrom asft_optim.cli import main\n"
        f"for blocked, argv in {cases!r}:\n"
        "    sys.modules.update(dict.fromkeys(blocked))\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(argv)\n"
        "    print(json.dumps([rc, err.getvalue()]))\n"
        "    for m in blocked:\n"
        "        del sys.modules[m]\n")
    assert run.returncode == 0, run.stderr
    assert [json.loads(line) for line in run.stdout.splitlines()] == [
        [2, "asft demo needs the 'hf' and 'plot' extras (not installed: transformers): pip install "
            "\"asft_optim[hf,plot]\" (from a checkout: pip install -e \".[hf,plot]\")\n"],
        [2, "asft finetune needs the 'hf' and 'plot' extras (not installed: peft, matplotlib): pip install "
            "\"asft_optim[hf,plot]\" (from a checkout: pip install -e \".[hf,plot]\")\n"]]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Two commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_commands_do_the_whole_setup_and_ci_runs_the_same_tests():
    demo, tests = _readme_commands()
    for line, run in ((demo, "asft demo"), (tests, "python -m pytest -q")):
        steps = line.split(" && ")
        assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
        assert steps[2].startswith('pip install "torch==2.13.0+cpu"') and steps[3].startswith("pip install -e \".[")
        assert steps[-1] == run
    assert '.[hf,plot]' in demo  # what `asft demo` needs (tests/test_install.py: the extras message)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests.replace(". .venv/bin/activate", '. "$VENV"/bin/activate').replace(
        "-m venv .venv", '-m venv "$VENV"') in ci


def test_kernels_folder_steps_aside_for_the_kernels_distribution(tmp_path):
    """From the clone's root, `import kernels` is not this repository's folder: it is the `kernels`
    distribution when one is installed (transformers ≥ 5, bitsandbytes), else an empty namespace
    module that transformers reads as not installed; and `asft_optim.kernels` still imports from the
    same folder."""
    run = _python("import kernels\nprint(kernels.__file__, [n for n in vars(kernels) if not n.startswith('__')])\n"
                  "from transformers.utils import import_utils\nprint(import_utils.is_kernels_available())")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["None []", "False"]
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return 'hub:' + name\n")
    run = _python(f"import sys; sys.path.append({str(site)!r})\nfrom kernels import get_kernel\n"
                  "print(get_kernel('x'))\nimport asft_optim.kernels as k\nprint(k.__file__, callable(k.fused_step_))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["hub:x", str(ROOT / "kernels" / "__init__.py"), "True"]


def test_a_build_ships_every_package(tmp_path):
    """`pip install .` copies what setuptools' build_py puts in the build folder: the kernels as
    asft_optim.kernels, and every subpackage with its modules."""
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    built = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.py")}
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "asft_optim").rglob("*.py")}
    source |= {f"asft_optim/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert built == source
