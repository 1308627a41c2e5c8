"""How many operations the batched CopyPaste dispatches per batch: the accelerator path's cost driver.

On a GPU the batched paste is bound by the host, not the device: every dispatched operation costs
host time (argument parsing, dispatch, a kernel launch for those that compute) whether it touches
ten pixels or a million. Counting them needs no GPU, so this runs anywhere: B=16 real images at
1024x1024 with 10 segments each (the GPU benchmark's batch), pasted by ``CopyPaste.apply`` with
``batched=True`` and each ``warp``, operations counted with a ``TorchDispatchMode``.

Both paths run as they would on an accelerator: ``groups`` is grouped with the accelerator's
group cost, and ``loop`` warps each piece with the accelerator's float kernel call (on the CPU it
otherwise round-trips each piece through the uint8 kernel, three more operations per piece, to stay
bit-identical to the per-image path). Prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, train_bank  # noqa: E402
from copypaste import load_images  # noqa: E402

from sos_aug import CopyPaste, RandomLayout, SOSLayout, batched_warp, composite  # noqa: E402

VIEWS = ("view", "select", "slice", "detach", "unsqueeze", "squeeze", "alias", "expand", "as_strided", "lift_fresh",
         "_local_scalar_dense", "split", "transpose", "t.default", "permute", "unbind")


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def split(self) -> dict:
        """All operations, and those that compute (on a GPU, roughly the kernel launches)."""
        computing = sum(n for op, n in self.counts.items() if not any(v in op for v in VIEWS))
        return {"operations": sum(self.counts.values()), "computing": computing}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--pastes", type=int, default=10)
    p.add_argument("--work", default="bench_out", help="where the bank is built")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    root = coco_mini()
    bank = train_bank(root, Path(args.work))
    data = load_images(root, args.batch, args.size)
    images = torch.stack([im for im, _ in data])
    targets = [t for _, t in data]
    batched_warp.GROUP_COST_FLOPS["cpu"] = batched_warp.GROUP_COST_FLOPS["accelerator"]  # group as on a GPU
    composite._warp_float = composite.warp_segment  # loop: the accelerator's float warp, not the uint8 round trip
    rows = {}
    for name, layout in (("random", RandomLayout(scale=(0.5, 2.0))), ("sos", SOSLayout())):
        probe = CopyPaste(bank, layout=layout, num_pastes=(args.pastes, args.pastes))
        g = torch.Generator().manual_seed(0)
        segments = probe.fetch(args.batch, g)
        params = probe.make_params([(args.size, args.size)] * args.batch, targets, segments, g)
        pieces = sum(len(pl) for pl in params)
        table, _ = batched_warp.piece_table(segments.rgba, params, args.size, args.size, args.pastes)
        groups = batched_warp.group_rows(table, batched_warp.GROUP_COST_FLOPS["accelerator"])
        for warp in ("loop", "groups"):
            cp = CopyPaste(bank, layout=layout, num_pastes=(args.pastes, args.pastes), batched=True, warp=warp)
            with CountOps() as counter:
                cp.apply(images, targets, segments, params)
            rows[f"{name}, warp={warp}"] = {**counter.split(), "pieces": pieces,
                                             "groups": len(groups) if warp == "groups" else pieces}
    info = {"machine": machine(), "batch": args.batch, "size": args.size, "pastes": args.pastes, "rows": rows}
    print(f"operations dispatched by one CopyPaste.apply, B={args.batch} at {args.size}², {args.pastes}/image")
    for k, v in rows.items():
        print(f"{k:22s} " + " ".join(f"{a}={b}" for a, b in v.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
