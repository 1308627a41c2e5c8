"""Training ``RelightNet``: self-supervised perturb-and-recover, or distillation from a teacher.

Perturb-and-recover (the protocol image-harmonization datasets use): take a real photo and a real
instance mask, perturb colour and lighting inside the mask, and train the net to recover the
original. With a ``teacher`` (e.g. IC-Light through :mod:`.teacher`), the targets are instead the
student's transform family fitted to the teacher's output inside the mask.
A held-out split of the images stops training at its best validation fMSE.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as nnf
from PIL import Image, ImageDraw
from tqdm import tqdm

from ...coco import Skips, load_coco
from ..family import apply_family, fit_family
from ..net import INPUT, RelightNet
from .data import InstancePool, training_batch
from .evaluate import NoInstancesError, evaluate
from .perturb import training_perturbation

Teacher = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (composite, alpha) -> relit


@dataclass
class TrainReport:
    steps: int = 0
    gain: float = 1.0
    best_val_fmse: float = float("inf")
    best_step: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    skipped: Skips = field(default_factory=Skips)  # unreadable images and bad segmentations left out


def split_ids(ids: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=g).tolist()
    n_val = max(1, int(round(len(ids) * val_fraction)))
    val = sorted(ids[i] for i in order[:n_val])
    return sorted(set(ids) - set(val)), val


def fmse(pred: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Foreground MSE on the 0-1 scale, averaged per sample then over the batch."""
    err = ((pred - target) ** 2 * alpha).sum((1, 2, 3)) / (3 * alpha.sum((1, 2, 3)).clamp(min=1))
    return err.mean()


def predict(net: RelightNet, composite: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Relight windows as deployment does: the net sees them at INPUT², the transform runs at full size."""
    small = nnf.interpolate(torch.cat([composite, alpha], 1), size=(INPUT, INPUT), mode="bilinear",
                            align_corners=False)
    small[:, 3:] = (small[:, 3:] >= 0.5).float()
    params = net.forward(small)
    out = apply_family(params, composite).clamp(0, 1)
    return composite * (1 - alpha) + out * alpha


def train_relight_net(
    ann_file: str | Path,
    images: str | Path,
    out: str | Path,
    minutes: float = 10.0,
    seed: int = 0,
    batch: int = 32,
    size: int = 96,
    lr: float = 2e-3,
    teacher: Teacher | None = None,
    val_fraction: float = 0.1,
    progress: bool = True,
    max_steps: int | None = None,
    device: str | torch.device = "cpu",
    workers: int = 0,
    resume: bool = False,
    resume_every_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> TrainReport:
    """Train and save the best (by held-out fMSE) weights to ``out``; writes ``out``.png (loss curve).

    ``minutes`` is the wall time of the whole run: reading the data and the closing gain calibration
    (timed on one held-out evaluation first) come out of it, and the rest trains.
    ``device`` runs the net there (e.g. "cuda"); ``workers`` > 0 builds training batches in that
    many DataLoader processes (each with its own generator, seeded from ``seed``), which a GPU
    needs to be kept busy. Every ``resume_every_s`` seconds (and on Ctrl-C) the whole training state
    goes to ``out``.resume.pt, atomically; ``resume=True`` continues from it (the same data, seed,
    batch and size; the time budget counts the minutes already trained). A finished run removes it.
    ``clock`` (seconds) measures the budget: tests pass one that ticks per call, so no result of
    theirs depends on how fast the machine is."""
    resume_file = Path(out).with_suffix(".resume.pt")
    if resume and not resume_file.is_file():  # said before the data is loaded
        raise FileNotFoundError(f"{resume_file}: nothing to resume (no interrupted run saved its state there)")
    wall_start = clock()  # the budget is wall time: loading and calibrating count too
    torch.manual_seed(seed)
    if teacher is not None and hasattr(teacher, "to"):  # the teacher runs where the student trains
        teacher.to(device)
    _say(progress, "relight train: reading the images and cutting the training and held-out instances ...")
    train_pool, val_pool, val_ids, skipped = _split_pools(ann_file, images, val_fraction, seed)
    _say(progress, f"  done in {clock() - wall_start:.0f} s")
    val_g = torch.Generator().manual_seed(seed + 1)
    val = training_targets(*training_batch(val_pool, 192, size, val_g, transplant=0.0, jitter=False), val_g, teacher)
    val = tuple(t.to(device) for t in val)
    setup = {"annotations": str(Path(ann_file).resolve()), "seed": seed, "batch": batch, "size": size,
             "teacher": teacher is not None}
    run = _Run(RelightNet().to(device), lr, TrainReport(skipped=skipped), torch.Generator().manual_seed(seed), setup)
    if resume:
        run.restore(resume_file)
    else:
        run.report.best_val_fmse = _evaluate(run.net, *val)
        run.report.val_loss.append((0, run.report.best_val_fmse))
    batches = _batches(train_pool, batch, size, seed + run.report.steps, run.g, workers,
                       make_targets=teacher is None)
    _say(progress, "  timing one held-out evaluation, to keep time for the gain calibration at the end ...")
    probe = clock()
    _held_out_score(run.net.cpu(), ann_file, images, val_ids)
    run.net.to(device)
    reserve = (clock() - probe) * len(GAINS)
    train_minutes = max(0.0, minutes - (clock() - wall_start + reserve) / 60)
    _say(progress, f"  {train_minutes:.1f} of {minutes:g} minutes left for training")
    try:
        _train(run, batches, val, teacher, out, train_minutes, max_steps, device, progress, resume_file,
               resume_every_s, clock)
    except KeyboardInterrupt:  # keep what was trained: rerun with resume=True (--resume) to go on
        run.save(resume_file)
        raise
    report, net = run.report, run.net
    net.load_state_dict(run.best_state)
    net.cpu()
    report.gain = calibrate_gain(net, ann_file, images, val_ids, progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net.save(out)
    save_loss_curve(report, out.with_suffix(".png"))
    resume_file.unlink(missing_ok=True)
    return report


def _split_pools(ann_file, images, val_fraction: float,
                 seed: int) -> tuple[InstancePool, InstancePool, list[int], Skips]:
    """The training and held-out instance pools (split by image), the held-out image ids, and the
    unreadable images and bad segmentations of both, counted together."""
    ids = [im["id"] for im in load_coco(ann_file, ("images", "annotations"))["images"]]
    train_ids, val_ids = split_ids(ids, val_fraction, seed)
    skipped = Skips()
    train_pool = InstancePool(ann_file, images, image_ids=train_ids, skips=skipped)
    val_pool = InstancePool(ann_file, images, image_ids=val_ids, skips=skipped)
    if len(train_pool) == 0 or len(val_pool) == 0:
        raise ValueError(f"{ann_file}: too few readable instances to train and validate on"
                         + (f"; skipped {skipped}" if skipped.counts else ""))
    return train_pool, val_pool, val_ids, skipped


class _Run:
    """What training carries from step to step, and what a resumed run needs back: the net, its
    optimiser, the report so far, the best weights, the batch generator and the time trained."""

    def __init__(self, net: RelightNet, lr: float, report: TrainReport, g: torch.Generator, setup: dict):
        self.net, self.lr, self.report, self.g, self.setup = net, lr, report, g, setup
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.02)
        self.best_state = {k: v.clone() for k, v in net.state_dict().items()}
        self.elapsed = 0.0  # seconds trained, over all resumed runs

    def save(self, path: Path) -> None:
        r = self.report
        state = {"setup": self.setup, "net": self.net.state_dict(), "opt": self.opt.state_dict(),
                 "best": self.best_state, "g": self.g.get_state(), "rng": torch.get_rng_state(),
                 "elapsed": self.elapsed,
                 "report": {"steps": r.steps, "best_val_fmse": r.best_val_fmse, "best_step": r.best_step,
                            "train_loss": r.train_loss, "val_loss": [list(v) for v in r.val_loss]}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def restore(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["setup"] != self.setup:
            raise ValueError(f"{path}: saved by a run with {state['setup']}, not {self.setup}")
        device = next(self.net.parameters()).device
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])  # moved to the parameters' device by the optimiser
        self.best_state = {k: v.to(device) for k, v in state["best"].items()}
        self.g.set_state(state["g"])
        torch.set_rng_state(state["rng"])  # dropout's draws
        self.elapsed = state["elapsed"]
        saved, r = state["report"], self.report
        r.steps, r.best_val_fmse, r.best_step = saved["steps"], saved["best_val_fmse"], saved["best_step"]
        r.train_loss, r.val_loss = list(saved["train_loss"]), [tuple(v) for v in saved["val_loss"]]


def _train(run: _Run, batches, val, teacher, out, minutes: float, max_steps: int | None, device, progress: bool,
           resume_file: Path, resume_every_s: float, clock: Callable[[], float]) -> None:
    """Steps until the time budget (or ``max_steps``) is spent; validation every 25 steps keeps the
    best weights (on disk too), and the resume state is saved every ``resume_every_s`` seconds."""
    net, opt, report = run.net, run.opt, run.report
    budget = minutes * 60
    started = clock() - run.elapsed  # a resumed run goes on with the time already trained
    saved_at = clock()
    bar = tqdm(total=int(budget), initial=min(int(run.elapsed), int(budget)), desc="relight train", unit="s",
               disable=not progress)
    while True:
        run.elapsed = clock() - started
        if run.elapsed >= budget or (max_steps is not None and report.steps >= max_steps):
            break
        item = next(batches) if teacher is None else training_targets(*next(batches), run.g, teacher)
        composite, alpha, target = (t.to(device) for t in item)
        for group in opt.param_groups:  # cosine decay over the time budget
            group["lr"] = run.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, run.elapsed / budget))))
        net.train()
        loss = fmse(predict(net, composite, alpha), target, alpha)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        report.steps += 1
        report.train_loss.append(loss.item())
        if report.steps % 25 == 0:
            v = _evaluate(net, *val)
            report.val_loss.append((report.steps, v))
            if v < report.best_val_fmse:
                report.best_val_fmse, report.best_step = v, report.steps
                run.best_state = {k: t.clone() for k, t in net.state_dict().items()}
                _checkpoint(run.best_state, out)
            if clock() - saved_at >= resume_every_s:
                run.save(resume_file)
                saved_at = clock()
            bar.set_postfix(train=f"{loss.item() * 255**2:.0f}", val=f"{v * 255**2:.0f}",
                            best=f"{report.best_val_fmse * 255**2:.0f}")
        bar.n = min(int(run.elapsed), bar.total)
        bar.refresh()
    bar.close()


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches; each DataLoader worker draws from its own seeded generator."""

    def __init__(self, pool: InstancePool, batch: int, size: int, seed: int, make_targets: bool):
        self.pool, self.batch, self.size, self.seed, self.make_targets = pool, batch, size, seed, make_targets

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        g = torch.Generator().manual_seed(self.seed * 1000 + 1 + (info.id if info else 0))
        torch.set_num_threads(1)
        return _stream(self.pool, self.batch, self.size, g, self.make_targets)


def _stream(pool: InstancePool, batch: int, size: int, g: torch.Generator, make_targets: bool):
    """Endless batches drawn from ``g``: with perturb-and-recover targets, or raw for a teacher."""
    while True:
        item = training_batch(pool, batch, size, g)
        yield training_targets(*item, g, None) if make_targets else item


def _batches(pool: InstancePool, batch: int, size: int, seed: int, g: torch.Generator, workers: int,
             make_targets: bool):
    """Training batches: built in this process from ``g``, or by ``workers`` DataLoader processes."""
    if workers <= 0:
        return _stream(pool, batch, size, g, make_targets)
    loader = torch.utils.data.DataLoader(_BatchStream(pool, batch, size, seed, make_targets), batch_size=None,
                                         num_workers=workers, prefetch_factor=4, persistent_workers=True)
    return iter(loader)


def training_targets(images, alphas, refs, g, teacher: Teacher | None):
    """(perturbed composite, alpha, target): the original (perturb-and-recover) or the family fitted
    to the teacher's relit composite (distillation)."""
    perturbed = training_perturbation(images, alphas, refs, g)
    if teacher is None:
        return perturbed, alphas, images
    with torch.no_grad():
        relit = teacher(perturbed, alphas)
    params = fit_family(perturbed, relit, alphas)
    with torch.no_grad():
        fitted = apply_family(params, perturbed).clamp(0, 1)
    return perturbed, alphas, perturbed * (1 - alphas) + fitted * alphas


GAINS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _held_out_score(net: RelightNet, ann_file, images, val_ids: list[int]) -> float | None:
    """Mean relative fMSE of both evaluation suites vs doing nothing, on the held-out images (None
    where there is nothing held out)."""
    try:
        result = evaluate(ann_file, images, net=net, image_ids=val_ids, with_oracle=False, baselines=False,
                          progress=False)
    except NoInstancesError:
        return None
    suites = result["suites"]
    return sum(s["net"]["fmse"] / s["as_is"]["fmse"] for s in suites.values()) / len(suites)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def calibrate_gain(net: RelightNet, ann_file, images, val_ids: list[int], progress: bool = True) -> float:
    """Pick the shrink toward the identity that does best on the held-out images under the evaluation
    protocol (mean relative fMSE of both suites vs doing nothing), and store it in the net."""

    net.eval()
    scores = {}
    for gain in tqdm(GAINS, desc="calibrating the gain on held-out images", disable=not progress):
        net.gain.fill_(gain)
        score = _held_out_score(net, ann_file, images, val_ids)
        if score is None:  # nothing held out to calibrate on: no shrink
            net.gain.fill_(1.0)
            return 1.0
        scores[gain] = score
    best = min(scores, key=scores.get)
    net.gain.fill_(best)
    if progress:
        print("held-out relative fMSE by gain: " + ", ".join(f"{g}: {v:.3f}" for g, v in scores.items()))
    return best


def _checkpoint(state: dict, out: str | Path) -> None:
    """Keep the best weights so far on disk (atomically), so an interrupted run is not lost."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    net = RelightNet()
    net.load_state_dict(state)
    net.save(out)


@torch.no_grad()
def _evaluate(net: RelightNet, composite, alpha, target) -> float:
    net.eval()
    return float(fmse(predict(net, composite, alpha), target, alpha))


def save_loss_curve(report: TrainReport, path: Path, size=(640, 360)) -> None:
    """Training loss (grey, smoothed) and held-out fMSE (blue) in 0-255² units, log scale."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    pad = 40
    train = report.train_loss
    smooth, acc = [], None
    for v in train:
        acc = v if acc is None else 0.95 * acc + 0.05 * v
        smooth.append(acc)
    values = [v for v in smooth] + [v for _, v in report.val_loss]
    if not values:
        img.save(path)
        return
    lo, hi = math.log10(max(min(values), 1e-8) * 255**2), math.log10(max(max(values), 1e-8) * 255**2)
    hi = hi if hi > lo else lo + 1
    steps = max(report.steps, 1)

    def xy(step, v):
        x = pad + (size[0] - 2 * pad) * step / steps
        y = size[1] - pad - (size[1] - 2 * pad) * (math.log10(max(v, 1e-8) * 255**2) - lo) / (hi - lo)
        return x, y

    if len(smooth) > 1:
        draw.line([xy(i + 1, v) for i, v in enumerate(smooth)], fill=(150, 150, 150), width=1)
    held_out = [xy(s, v) for s, v in report.val_loss]
    if len(held_out) > 1:
        draw.line(held_out, fill=(30, 90, 200), width=2)
    for x, y in held_out:  # a point per evaluation, so a single one shows too
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
    draw.rectangle([pad, pad, size[0] - pad, size[1] - pad], outline="black")
    # PIL's built-in bitmap font has no superscript two: write the units as 0-255^2
    draw.text((pad, 10), f"fMSE (0-255^2, log) train grey, held-out blue; best {report.best_val_fmse * 255**2:.0f} "
              f"at step {report.best_step}", fill="black")
    draw.text((pad, size[1] - pad + 8), f"0 .. {report.steps} steps   range {10**lo:.0f} .. {10**hi:.0f}",
              fill="black")
    img.save(path)
