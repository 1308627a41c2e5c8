"""`sos-aug relight train` killed mid-run loses nothing it saved: rerun with --resume, it goes on from
its last saved step (weights, optimiser, report, generator, time trained), and refuses a state saved
under other settings."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from sos_aug.relight import RelightNet
from sos_aug.relight.training.train import train_relight_net

SMALL = {"minutes": 5, "batch": 4, "size": 32, "progress": False}


def ticking():
    """A clock that advances a millisecond per reading: five minutes of budget last 300,000
    readings (a few per step), however fast or busy the machine is."""
    return itertools.count(step=0.001).__next__


@pytest.fixture
def few_images(tmp_path, train_ann):
    """train2017's annotations cut to its first 12 annotated images: a small run's data."""
    data = json.loads(train_ann.read_text())
    ids = sorted({a["image_id"] for a in data["annotations"] if not a["iscrowd"]})[:12]
    keep = set(ids)
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = tmp_path / "few.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_a_killed_training_run_resumes_from_its_saved_state(tmp_path, few_images, coco_mini):
    train_ann, images, out = few_images, coco_mini / "train2017", tmp_path / "w.pt"
    script = (f"import itertools\nfrom sos_aug.relight.training.train import train_relight_net\n"
              f"train_relight_net({str(train_ann)!r}, {str(images)!r}, {str(out)!r}, resume_every_s=0, "
              f"clock=itertools.count(step=0.001).__next__, **{SMALL!r})")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    resume = out.with_suffix(".resume.pt")
    while not resume.exists() and proc.poll() is None:  # the first save: after 25 steps
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    _, err = proc.communicate()
    assert resume.exists(), err[-2000:]
    saved = torch.load(resume, weights_only=True)
    steps, val_loss = saved["report"]["steps"], [tuple(v) for v in saved["report"]["val_loss"]]
    assert steps >= 25 and saved["elapsed"] > 0
    shutil.copy(resume, tmp_path / "saved.pt")

    # nothing more to train: the result is the best weights saved before the kill
    report = train_relight_net(train_ann, images, out, resume=True, max_steps=steps, clock=ticking(), **SMALL)
    assert report.steps == steps and report.best_step == saved["report"]["best_step"]
    weights = RelightNet.load(out).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved["best"].items() if k != "gain")

    shutil.copy(tmp_path / "saved.pt", resume)
    report = train_relight_net(train_ann, images, out, resume=True, max_steps=steps + 25, clock=ticking(), **SMALL)
    assert report.steps == steps + 25 and len(report.train_loss) == steps + 25
    assert report.val_loss[: len(val_loss)] == val_loss  # the history before the kill, then more
    assert report.val_loss[-1][0] == steps + 25
    assert not resume.exists() and isinstance(RelightNet.load(out), RelightNet)

    shutil.copy(tmp_path / "saved.pt", resume)
    with pytest.raises(ValueError, match="saved by a run with"):
        train_relight_net(train_ann, images, out, resume=True, **{**SMALL, "batch": 8})
    resume.unlink()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_relight_net(train_ann, images, out, resume=True, **SMALL)


@pytest.mark.slow
def test_ctrl_c_saves_the_state_to_resume_from(tmp_path, few_images, coco_mini):
    """A user's teacher callable; the user presses Ctrl-C while it relights the 40th batch (its first
    call made the validation targets), so 38 steps are done and saved, with no periodic save."""
    calls = []

    def teacher(composite: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        calls.append(len(composite))
        if len(calls) == 40:
            raise KeyboardInterrupt
        return composite.flip(1)  # red and blue swapped: a relighting the family can fit

    out = tmp_path / "w.pt"
    with pytest.raises(KeyboardInterrupt):
        train_relight_net(few_images, coco_mini / "train2017", out, teacher=teacher, resume_every_s=1e9,
                          clock=ticking(), **SMALL)
    state = torch.load(out.with_suffix(".resume.pt"), weights_only=True)
    assert state["report"]["steps"] == 38 and len(state["report"]["train_loss"]) == 38
    assert state["setup"]["teacher"] is True


@pytest.mark.slow
def test_ctrl_c_on_the_command_says_how_to_go_on(tmp_path, few_images, coco_mini):
    out = tmp_path / "w.pt"
    cmd = [sys.executable, "-m", "sos_aug.cli", "relight", "train", "--coco", str(few_images), "--images",
           str(coco_mini / "train2017"), "--out", str(out), "--minutes", "600"]
    # Ctrl-C reaches the command even where this test runs as a background job, whose shell starts
    # it with SIGINT ignored (Python then installs no KeyboardInterrupt handler in the child)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while "best=" not in seen and proc.poll() is None:  # the bar's first validation: 25 steps are done
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    err = seen + proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert f"training state in {out.with_suffix('.resume.pt')}" in err and "--resume" in err
    assert torch.load(out.with_suffix(".resume.pt"), weights_only=True)["report"]["steps"] > 0


def test_the_loss_curve_shows_a_single_held_out_point(tmp_path):
    """One held-out evaluation is still drawn (as a point), beside the smoothed training loss."""
    import numpy as np
    from PIL import Image

    from sos_aug.relight.training.train import TrainReport, save_loss_curve

    report = TrainReport(steps=20, best_val_fmse=0.01, best_step=10, train_loss=[0.03 - 0.001 * i for i in range(20)],
                         val_loss=[(10, 0.01)])
    save_loss_curve(report, tmp_path / "curve.png")
    pixels = np.asarray(Image.open(tmp_path / "curve.png").convert("RGB")).reshape(-1, 3)
    assert ((pixels == (30, 90, 200)).all(1)).sum() >= 9  # the held-out point
    assert ((pixels == (150, 150, 150)).all(1)).sum() > 20  # the training line
