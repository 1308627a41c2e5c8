"""The training-effect benchmark's reading of its runs: per-arm summaries, paired differences with
95% intervals (a bootstrap over validation images and seeds at once), the markdown table, curves,
and the diagnosis of what each arm pastes."""

from __future__ import annotations

import json
from pathlib import Path

import ap_bootstrap
import numpy as np
import torch

BASELINES = ("none", "mmdet")
# effects that one change between two arms isolates: (arm, against, what the difference measures)
CONTRASTS = (("sos_relight", "stats", "relighting (net + LabBlend), same layout and bank"),
             ("external", "sos_relight", "segments from outside the labelled images, same recipe"),
             ("external", "mmdet_external", "the default against mmdet's rule, both pasting the external images"),
             ("stats", "sos", "DatasetStatsLayout against SOSLayout, no relighting"))
HEADLINE = ("bbox_AP", "segm_AP", "bbox_AP50", "segm_AP50")
COLOURS = {"none": "black", "mmdet": "tab:orange", "random": "tab:grey", "sos": "tab:green", "stats": "tab:blue",
           "sos_relight": "tab:purple", "external": "tab:red", "mmdet_external": "tab:brown", "real": "black"}


def summarize(results: list[dict], aug_keys: dict[str, str], draws: int = 1000, seed: int = 0) -> dict:
    """Per arm, over the runs under its current augmentation (``aug_keys``; others are listed under
    ``left_out``): mean and std over seeds of each headline metric and class, minutes per run,
    pasted objects per pasted image, test metrics; and the paired difference against each baseline
    over the seeds both finished, with a 95% interval from ``draws`` joint resamples of validation
    images and seeds (where every run kept its match records)."""
    by_arm: dict[str, dict[int, dict]] = {}
    left_out = []
    for r in results:
        if r.get("aug_key") != aug_keys.get(r["arm"]):
            left_out.append({"arm": r["arm"], "seed": r["seed"], "aug_key": r.get("aug_key")})
            continue
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    aps = _bootstrap_aps(by_arm, draws, seed)
    rng = np.random.default_rng(seed + 1)
    summary = {}
    for arm, runs in by_arm.items():
        row: dict = {"seeds": sorted(runs)}
        for k in HEADLINE:
            row[k] = _mean_std([r["metrics"][k] for r in runs.values()])
        for kind in ("bbox", "segm"):
            cats = sorted({c for r in runs.values() for c in r["metrics"].get(f"{kind}_per_category", {})})
            row[f"{kind}_per_category"] = {c: _mean_std([r["metrics"][f"{kind}_per_category"].get(c, 0.0)
                                                         for r in runs.values()]) for c in cats}
        row["minutes_per_run"] = round(float(np.mean([(r.get("train_seconds", 0) + r.get("eval_seconds", 0)) / 60
                                                      for r in runs.values()])), 1)
        into = [r["pasted"] / r["pasted_into"] for r in runs.values() if r.get("pasted_into")]
        row["pasted_per_pasted_image"] = round(float(np.mean(into)), 2) if into else 0.0
        tests = [r["test"] for r in runs.values() if "test" in r]
        if tests:
            row["test"] = {"file": tests[0]["file"], "seeds": len(tests),
                           **{k: _mean_std([t[k] for t in tests]) for k in ("bbox_AP", "segm_AP")}}
        for base in BASELINES:
            if arm != base and base in by_arm:
                row.update(_differences(arm, base, by_arm, aps, rng))
        summary[arm] = row
    contrasts = [{"arm": arm, "against": base, "measures": what, **_differences(arm, base, by_arm, aps, rng)}
                 for arm, base, what in CONTRASTS if arm in by_arm and base in by_arm]
    return {"arms": summary, "contrasts": contrasts, "left_out": left_out, "bootstrap_draws": draws}


def _differences(arm: str, base: str, by_arm: dict, aps: dict, rng: np.random.Generator) -> dict:
    """``arm`` minus ``base`` in box and mask AP over the seeds both finished: mean, per seed, and
    the 95% interval of the joint bootstrap (where both kept their match records)."""
    common = sorted(set(by_arm[arm]) & set(by_arm[base]))
    out = {}
    for k in ("bbox_AP", "segm_AP") if common else ():
        diffs = [by_arm[arm][sd]["metrics"][k] - by_arm[base][sd]["metrics"][k] for sd in common]
        cell = {"mean": round(float(np.mean(diffs)), 2), "per_seed": [round(d, 2) for d in diffs],
                "seeds": len(common)}
        kind = k.split("_")[0]
        if aps.get((arm, kind)) is not None and aps.get((base, kind)) is not None:
            cell["ci95"] = _paired_interval(aps[(arm, kind)], aps[(base, kind)], common, rng)
        out[f"{k}_vs_{base}"] = cell
    return out


def _mean_std(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 2), "std": round(float(v.std(ddof=1)), 2) if len(v) > 1 else None}


def _bootstrap_aps(by_arm: dict[str, dict[int, dict]], draws: int, seed: int) -> dict:
    """(arm, kind) -> {seed: AP under each of ``draws`` resamples of the validation images}, the
    same resamples for every run (paired); None where a run kept no match records."""
    out: dict = {}
    counts = None
    for arm, runs in by_arm.items():
        for kind in ("bbox", "segm"):
            recs = {}
            for sd, r in runs.items():
                rec = ap_bootstrap.load(Path(r["matches"])).get(kind) if r.get("matches") else None
                if rec is None:
                    recs = None
                    break
                recs[sd] = rec
            if recs is None:
                out[(arm, kind)] = None
                continue
            if counts is None:
                n = next(iter(recs.values()))["gt"].shape[0]
                rng = np.random.default_rng(seed)
                counts = [np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)]
            out[(arm, kind)] = {sd: np.array([ap_bootstrap.average_precision(rec, c) for c in counts])
                                for sd, rec in recs.items()}
    return out


def _paired_interval(a: dict[int, np.ndarray], b: dict[int, np.ndarray], seeds: list[int],
                     rng: np.random.Generator) -> list[float]:
    """2.5 and 97.5 percentiles of the mean paired difference when the validation images (already
    resampled in ``a`` and ``b``, the same draws) and the seeds are resampled together."""
    diff = np.stack([a[sd] - b[sd] for sd in seeds])  # (seeds, draws)
    picks = rng.integers(0, len(seeds), (diff.shape[1], len(seeds)))
    means = diff[picks, np.arange(diff.shape[1])[:, None]].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [round(float(lo), 2), round(float(hi), 2)]


def markdown_table(summary: dict, order: tuple[str, ...] | None = None) -> str:
    """The summary as the README's table: mean ± std over seeds, the paired differences against
    ``none`` and ``mmdet`` with their 95% intervals, minutes per run."""
    arms = summary["arms"]

    def pm(v: dict | None) -> str:
        if not v:
            return "-"
        return f"{v['mean']:.2f}" + (f" ± {v['std']:.2f}" if v.get("std") is not None else "")

    def diff(v: dict | None) -> str:
        if not v:
            return "-"
        ci = f" [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]" if "ci95" in v else ""
        return f"{v['mean']:+.2f}{ci}"

    lines = ["| arm | seeds | box AP | mask AP | mask AP vs none [95%] | mask AP vs mmdet [95%] | "
             "box AP vs none [95%] | box AP vs mmdet [95%] | pasted / pasted image | min / run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in order or [a for a in COLOURS if a in arms]:
        if arm not in arms:
            continue
        r = arms[arm]
        lines.append(f"| {arm} | {len(r['seeds'])} | {pm(r['bbox_AP'])} | {pm(r['segm_AP'])} | "
                     f"{diff(r.get('segm_AP_vs_none'))} | {diff(r.get('segm_AP_vs_mmdet'))} | "
                     f"{diff(r.get('bbox_AP_vs_none'))} | {diff(r.get('bbox_AP_vs_mmdet'))} | "
                     f"{r['pasted_per_pasted_image'] or '-'} | {r['minutes_per_run']} |")
    if summary.get("contrasts"):
        lines += ["", "| effect | arm - against | seeds | mask AP [95%] | box AP [95%] |", "|---|---|---:|---:|---:|"]
        for c in summary["contrasts"]:
            mask, box = c.get(f"segm_AP_vs_{c['against']}"), c.get(f"bbox_AP_vs_{c['against']}")
            seeds = mask["seeds"] if mask else 0
            lines.append(f"| {c['measures']} | {c['arm']} - {c['against']} | {seeds} | {diff(mask)} | {diff(box)} |")
    return "\n".join(lines)


def per_class_table(summary: dict, kind: str = "segm") -> str:
    """Mean per-class AP of each arm (``segm`` or ``bbox``)."""
    arms = summary["arms"]
    order = [a for a in COLOURS if a in arms]
    cats = sorted({c for a in order for c in arms[a][f"{kind}_per_category"]})
    lines = ["| arm | " + " | ".join(cats) + " |", "|---|" + "---:|" * len(cats)]
    for arm in order:
        cells = arms[arm][f"{kind}_per_category"]
        lines.append(f"| {arm} | " + " | ".join(f"{cells[c]['mean']:.2f}" if c in cells else "-" for c in cats) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: list[dict], path: Path, label=lambda r: r["arm"]) -> None:
    """AP at each curve point, one line per run, coloured by arm (or labelled by ``label``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = sorted({label(r) for r in results})
    cmap = plt.get_cmap("tab10")
    seen = set()
    for r in results:
        name = label(r)
        colour = COLOURS.get(name, cmap(labels.index(name) % 10))
        steps = [c["step"] for c in r["curve"]]
        for ax, key in zip(axes, ("bbox_AP", "segm_AP")):
            ax.plot(steps, [c[key] for c in r["curve"]], marker="o", color=colour,
                    label=name if (name, key) not in seen else None, alpha=0.8)
            seen.add((name, key))
    for ax, key in zip(axes, ("box AP", "mask AP")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key} (valid)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- diagnosis -------------------------------------------------------------------------------------


def instance_stats(targets: list[dict], pasted: bool) -> dict[str, np.ndarray]:
    """Label, size (square root of the mask's area over the image's) and centre (fractions of
    the image) of the pasted (or the real) instances of a batch's targets."""
    rows = []
    for t in targets:
        masks = t["masks"].as_subclass(torch.Tensor).bool()
        flag = t.get("is_pasted", torch.zeros(len(masks), dtype=torch.bool))
        sel = flag if pasted else ~flag
        h, w = masks.shape[-2:]
        for m, lab in zip(masks[sel], t["labels"][sel].tolist()):
            ys, xs = m.nonzero(as_tuple=True)
            rows.append((lab, (len(ys) / (h * w)) ** 0.5, float(ys.float().mean()) / h, float(xs.float().mean()) / w))
    arr = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return {"label": arr[:, 0].astype(int), "size": arr[:, 1], "y": arr[:, 2], "x": arr[:, 3]}


def diagnose(batchers: dict, batch: int, data: dict, batches: int, results_dir: Path) -> dict:
    """Draw ``batches`` batches of ``batch`` images from every pasting arm's batcher (no training)
    and compare what it pastes with the labelled set's real instances, per class: sizes, vertical
    and horizontal positions, and how many pasted objects survive in a pasted image. Writes
    diagnosis.png and diagnosis.json."""
    real = instance_stats([t for _, t in data["samples"]], pasted=False)
    per_arm = {}
    for arm, batcher in batchers.items():
        stats, counts = [], []
        for _ in range(batches):
            _, targets = batcher.next()
            stats.append(instance_stats(targets, pasted=True))
            counts += [int(t["is_pasted"].sum()) for t in targets if "is_pasted" in t and bool(t["is_pasted"].any())]
        per_arm[arm] = ({k: np.concatenate([st[k] for st in stats]) for k in real}, np.array(counts))
    categories = {c["id"]: c["name"] for c in data["categories"]}
    report = {"batches": batches, "real": _describe(real, categories),
              "arms": {arm: {**_describe(st, categories), "pasted_per_pasted_image": round(float(c.mean()), 2)
                             if len(c) else 0.0, "images_pasted_into": round(len(c) / (batches * batch), 3)}
                       for arm, (st, c) in per_arm.items()}}
    results_dir.mkdir(parents=True, exist_ok=True)
    _plot_diagnosis(real, per_arm, categories, results_dir / "diagnosis.png")
    (results_dir / "diagnosis.json").write_text(json.dumps(report, indent=1))
    return report


def _describe(st: dict[str, np.ndarray], categories: dict[int, str]) -> dict:
    out = {}
    for cid, name in categories.items():
        sel = st["label"] == cid
        if sel.any():
            q = np.percentile(st["size"][sel], [10, 50, 90])
            out[name] = {"n": int(sel.sum()), "size_p10_p50_p90": [round(float(v), 4) for v in q],
                         "y_median": round(float(np.median(st["y"][sel])), 3)}
    return out


def _plot_diagnosis(real: dict, per_arm: dict, categories: dict[int, str], path: Path) -> None:
    plt = _pyplot()
    cats = list(categories.items())
    fig, axes = plt.subplots(len(cats) + 1, 3, figsize=(13, 3 * (len(cats) + 1)))
    size_bins = np.logspace(-2.5, 0, 40)
    pos_bins = np.linspace(0, 1, 21)
    for row, (cid, name) in enumerate(cats):
        for col, (key, bins) in enumerate((("size", size_bins), ("y", pos_bins), ("x", pos_bins))):
            ax = axes[row, col]
            for arm, st in [("real", real)] + [(a, v[0]) for a, v in per_arm.items()]:
                values = st[key][st["label"] == cid]
                if len(values):
                    hist, edges = np.histogram(values, bins=bins, density=True)
                    ax.step(edges[:-1], hist, where="post", color=COLOURS.get(arm, "grey"),
                            lw=2.5 if arm == "real" else 1.3, label=f"{arm} ({len(values)})")
            if key == "size":
                ax.set_xscale("log")
            ax.set_title(f"{name}: " + {"size": "sqrt(area / image area)", "y": "centre y / H (0 = top)",
                                         "x": "centre x / W"}[key], fontsize=9)
            if col == 0:
                ax.legend(fontsize=7)
    ax = axes[-1, 0]
    top = max([int(c.max()) for _, c in per_arm.values() if len(c)] + [1])
    for arm, (_, c) in per_arm.items():
        if len(c):
            ax.hist(c, bins=np.arange(top + 2) - 0.5, histtype="step", density=True, color=COLOURS.get(arm, "grey"),
                    label=f"{arm} (mean {c.mean():.1f})")
    ax.set_title("pasted objects that survive, per pasted image", fontsize=9)
    ax.legend(fontsize=7)
    for ax in axes[-1, 1:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
