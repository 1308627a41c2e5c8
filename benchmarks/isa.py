"""Equal-work CopyPaste vs mmdet 3.3 with every library's vector code capped at AVX2, beside the same
run uncapped: what AVX-512 is worth to each side, and which of sos_aug's operations lose most.

The equal-work ratio was ~4.6x on an AVX-512 Xeon and 3.4x-3.6x on an AMD EPYC without AVX-512,
but those machines differ in more than their vector width. Here one machine runs both: the capped
children cap torch's kernels (``ATEN_CPU_CAPABILITY=avx2``), oneDNN (``ONEDNN_MAX_CPU_ISA``), NumPy
(``NPY_DISABLE_CPU_FEATURES``) and OpenCV (``OPENCV_CPU_DISABLE``) at AVX2; zstd and PIL have no
AVX-512 paths. Capped and uncapped children take turns, each timing both methods in turns
(:func:`copypaste.measure`, by this process's CPU time: the machine may be shared), then profiling
one pass of sos_aug (torch's profiler, self time per operation) and of mmdet (cProfile, NumPy's
functions and methods). Ratios, not times, are the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sos_aug.allocator import keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, train_bank  # noqa: E402
from copypaste import bench_mmdet, bench_sos, load_images, measure  # noqa: E402

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
             "OPENCV_CPU_DISABLE": "AVX512-SKX,AVX512-CLX,AVX512-CNL,AVX512-ICL"}


def child(args) -> dict:
    """One process's figures: both methods timed in turns, then one profiled pass of each."""
    torch.set_num_threads(1)
    keep_freed_memory()  # as in a CopyPasteCollate worker (and benchmarks/copypaste.py)
    root = coco_mini()
    bank = train_bank(root, Path(args.work))
    data = load_images(root, args.images, args.size)
    mmdet = bench_mmdet(data)
    k = max(1, round(mmdet() / len(data)))  # sos_aug at mmdet's pasted count: equal work
    runners = {"mmdet": mmdet, "sos": bench_sos(bank, data, 8, (k, k)),
               "sos pre-fetched": bench_sos(bank, data, 8, (k, k), prefetched=args.repeats + 2)}
    rows = measure(runners, args.repeats, len(data), clock=time.process_time)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "pasted_per_image": k,
            "ms_per_image": {name: r["ms_per_image"] for name, r in rows.items()},
            "sos_ops": _torch_ops(runners["sos pre-fetched"], len(data)),
            "mmdet_ops": _python_ops(mmdet, len(data))}


def _torch_ops(run, n_images: int) -> dict[str, float]:
    """Self CPU time per torch operation, ms per image, over one pass."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.key: e.self_cpu_time_total / 1000 / n_images for e in prof.key_averages()}


def _python_ops(run, n_images: int) -> dict[str, float]:
    """Self time per C function (NumPy's ufuncs and methods, OpenCV) over one pass, ms per image."""
    profiler = cProfile.Profile()
    profiler.runcall(run)
    out = {}
    for (file, _, name), (_, _, self_time, _, _) in pstats.Stats(profiler).stats.items():
        if file == "~":  # built-ins: the C code
            out[name] = out.get(name, 0.0) + 1000 * self_time / n_images
    return out


def _run_child(capped: bool, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(AVX2_ONLY if capped else {})}
    cmd = [sys.executable, __file__, "--child", "--images", str(args.images), "--size", str(args.size),
           "--repeats", str(args.repeats), "--work", args.work]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _losses(uncapped: list[dict], capped: list[dict], key: str, top: int) -> list[tuple[str, float, float]]:
    """The ``top`` operations by time (either run's), as (name, uncapped ms, capped ms) per image,
    medians over the rounds, those that grow most when capped first."""
    names = {name for r in uncapped + capped for name in r[key]}

    def median(rows: list[dict], name: str) -> float:
        return statistics.median(r[key].get(name, 0.0) for r in rows)

    rows = [(name, median(uncapped, name), median(capped, name)) for name in names]
    rows = sorted(rows, key=lambda r: max(r[1], r[2]), reverse=True)[:top]
    return sorted(rows, key=lambda r: r[2] - r[1], reverse=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timing rounds within each child")
    p.add_argument("--rounds", type=int, default=2, help="capped and uncapped children, in turns")
    p.add_argument("--top", type=int, default=12, help="operations listed per side")
    p.add_argument("--work", default="bench_out", help="where the bank is built")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = {"uncapped": [], "capped": []}
    for _ in range(args.rounds):
        for capped in (False, True):
            results["capped" if capped else "uncapped"].append(_run_child(capped, args))
    report = {"machine": machine(), "images": args.images, "size": args.size, "env_capped": AVX2_ONLY,
              "capabilities": {mode: rows[0]["capability"] for mode, rows in results.items()}, "runs": results}
    print(f"machine: {machine()}; {args.images} real COCO images at {args.size}², one thread; "
          f"{args.rounds} rounds of capped / uncapped children")
    print(f"{'':22s} {'uncapped ms':>12s} {'AVX2 ms':>9s} {'slower':>7s}")
    summary = {}
    for name in results["uncapped"][0]["ms_per_image"]:
        ms = {mode: statistics.median(r["ms_per_image"][name] for r in rows) for mode, rows in results.items()}
        summary[name] = ms
        print(f"{name:22s} {ms['uncapped']:12.2f} {ms['capped']:9.2f} {ms['capped'] / ms['uncapped']:6.2f}x")
    ratios = {mode: {"equal work vs mmdet": summary["mmdet"][mode] / summary["sos"][mode],
                     "pre-fetched": summary["mmdet"][mode] / summary["sos pre-fetched"][mode]} for mode in results}
    for mode, r in ratios.items():
        print(f"{mode}: sos_aug vs mmdet {r['equal work vs mmdet']:.2f}x ({r['pre-fetched']:.2f}x pre-fetched)")
    report.update(summary=summary, ratios=ratios)
    for side, key in (("sos_aug (torch ops, pre-fetched)", "sos_ops"), ("mmdet (C functions)", "mmdet_ops")):
        losses = _losses(results["uncapped"], results["capped"], key, args.top)
        report[key + "_losses"] = losses
        print(f"\n{side}: the {args.top} largest, ms per image, those that lose most first")
        for name, before, after in losses:
            print(f"  {name[:60]:60s} {before:7.2f} -> {after:7.2f}  (+{after - before:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
