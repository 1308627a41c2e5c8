"""The README's snippets run exactly as written, in a folder laid out as they assume
(``annotations/``, ``train2017/`` from coco-mini, ``banks/coco_train`` built by the README's own
``bank build`` command)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def block(after: str, language: str) -> str:
    """The first fenced ``language`` block after the line containing ``after``."""
    text = README.read_text()
    start = text.index(after)
    found = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert found, f"no {language} block after {after!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory, coco_mini):
    """A user's folder: their COCO files where the README's snippets look, and the bank the README's
    command builds from them."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "annotations").mkdir()
    (folder / "annotations" / "instances_train2017.json").symlink_to(coco_mini / "annotations" /
                                                                      "instances_train2017.json")
    (folder / "train2017").symlink_to(coco_mini / "train2017")
    command = block("## Use", "bash").strip()
    assert command.startswith("sos-aug bank build")
    proc = subprocess.run([sys.executable, "-m", "sos_aug.cli", *command.split()[1:], "--quiet"], cwd=folder,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return folder


def run(code: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True)


@pytest.mark.slow
def test_the_use_snippet_runs_as_written(user_folder):
    code = block("## Use", "python") + "\nprint('targets', sorted(targets[0]))\n"
    proc = run(code, user_folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'is_pasted'" in proc.stdout and "'masks'" in proc.stdout


@pytest.mark.slow
def test_the_detectron2_snippet_runs_as_written(user_folder):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI: build it from source)")
    code = block("**detectron2**", "python") + (
        "\nbatch = next(iter(loader))\n"
        "print('pasted', sum(int(d['instances'].is_pasted.sum()) for d in batch))\n")
    proc = run(code, user_folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("pasted")[-1]) > 0
