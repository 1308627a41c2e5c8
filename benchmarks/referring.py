"""What verified referring expressions cost beside compositing: for real coco-mini images holding
about 20 instances after pasting, the time to write 20 verified expressions against the time to
composite that image on the CPU (one thread, interleaved rounds, medians; ratios to read).

    OMP_NUM_THREADS=1 python benchmarks/referring.py [--images 8] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, print_and_save, train_bank  # noqa: E402

from sos_aug import CocoInstances, CopyPaste, label_map_from_coco  # noqa: E402
from sos_aug.referring import KINDS, Referring  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="images measured (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians kept")
    p.add_argument("--expressions", type=int, default=20, help="expressions per image (default %(default)s)")
    p.add_argument("--work", default="bench_out/referring", help="where the bank is built")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = coco_mini()
    ann = root / "annotations" / "instances_val2017.json"
    bank = train_bank(root, Path(args.work))
    ds = CocoInstances(ann, root / "val2017")
    names = {c["id"]: c["name"] for c in ds.categories}
    # images with 8-15 real instances; pasting brings them to about 20
    picks = [i for i in range(len(ds)) if 8 <= len(ds.anns[ds.infos[i]["id"]]) <= 15][: args.images]
    per_kind = {k: -(-args.expressions // len(KINDS)) + 1 for k in KINDS}  # a mix of kinds
    referring = Referring(per_kind=per_kind, limit=args.expressions, vocabulary=sorted(names.values()))
    cp = CopyPaste(bank, num_pastes=(6, 10), label_map=label_map_from_coco(ann), referring=referring)
    g = torch.Generator().manual_seed(0)
    prepared = []
    for i in picks:
        image, target = ds[i]
        segments = cp.fetch(1, g)
        params = cp.draw_placements([tuple(image.shape[-2:])], [target], segments, g)
        prepared.append((image, target, segments, params))

    def composite():
        return [cp.paste([im], [t], s, pr) for im, t, s, pr in prepared]

    outputs = [(ims[0], ts[0], before) for (ims, ts), (_, before, _, _) in zip(composite(), prepared)]

    def refer():  # as CopyPaste does after pasting: segments' sources and the instances before pasting
        return [len(cp.refer(image, target, torch.Generator().manual_seed(1), before))
                for image, target, before in outputs]

    times = {"composite": [], "refer": []}
    counts = refer()
    for _ in range(args.rounds):
        for name, fn in (("composite", composite), ("refer", refer)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / len(prepared) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"machine": machine(), "images": len(prepared),
              "instances_per_image": statistics.mean(len(t["labels"]) for _, t, _ in outputs),
              "expressions_per_image": statistics.mean(counts),
              "ms_per_image": {k: round(v, 2) for k, v in med.items()},
              "refer_over_composite": round(med["refer"] / med["composite"], 2)}
    return print_and_save(report, args.json)


if __name__ == "__main__":
    main()
