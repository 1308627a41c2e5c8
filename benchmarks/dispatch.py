"""How many operations the batched CopyPaste dispatches per batch: the accelerator path's cost driver.

On a GPU the batched paste is bound by the host, not the device: every dispatched operation costs
host time (argument parsing, dispatch, a kernel launch for those that compute) whether it touches
ten pixels or a million. Counting them needs no GPU, so this runs anywhere: B=16 real images at
1024x1024 with 10 segments each (the GPU benchmark's batch), pasted by ``CopyPaste.paste`` with
the batched backend (size groups, and piece by piece as rotated pieces go), operations counted with a
``TorchDispatchMode``.

Both paths run as they would on an accelerator: ``groups`` is grouped with the accelerator's
group cost, and ``loop`` warps each piece with the accelerator's float kernel call (on the CPU it
otherwise round-trips each piece through the uint8 kernel, three more operations per piece, to stay
bit-identical to the per-image path). Prints a table and writes ``--json``.

Then the net's relighting of the pasted batch as on an accelerator (``relight_group``'s windows
and forward: the pixel pass after them is one Triton launch there), three ways: all eager; the
windows eager and the forward compiled (the GPU default before); both in one compiled graph (the
GPU default now). Counted with torch.profiler (a dispatch mode would see inside compiled code): the
operations dispatched from Python, which is what costs host time per call. On a GPU, the compiled
code's own kernels add a launch each (not counted: on the CPU they are one C++ function).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import coco_mini, machine, piece_by_piece, train_bank  # noqa: E402
from copypaste import load_images  # noqa: E402

from sos_aug import CopyPaste, RandomLayout, SOSLayout  # noqa: E402
from sos_aug.ops.resize import warp_segment  # noqa: E402
from sos_aug.paste import batched, groups  # noqa: E402
from sos_aug.paste.geometry import piece_table  # noqa: E402
from sos_aug.relight import RelightNet  # noqa: E402
from sos_aug.relight import net as net_module  # noqa: E402

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


def dispatched_from_python(fn) -> int:
    """Operations ``fn()`` dispatches at top level (not those inside another operation), by
    torch.profiler; ``fn`` runs once before, so that compiling is not counted."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():  # as relighting runs
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    ops = ("aten::", "torchvision::")
    return sum(e.name.startswith(ops) and not (e.cpu_parent and e.cpu_parent.name.startswith(ops))
               for e in prof.events())


def relight_rows(cp: CopyPaste, images: torch.Tensor, targets: list, segments, params) -> dict:
    """Operations dispatched by the net's windows and forward on the batch ``cp`` pastes, three ways."""
    from sos_aug.ops.masks import row_owners

    out_images, out_targets = cp.paste(images, targets, segments, params)
    masks = [t["masks"][t["is_pasted"]] for t in out_targets]
    segs, owner = torch.cat(masks), row_owners([len(m) for m in masks])
    tight = torch.cat([t["boxes"][t["is_pasted"]] for t in out_targets]).float()
    batch = torch.stack(out_images).contiguous()
    all_eager, forward_compiled, one_graph = (RelightNet.pretrained(compile_cpu=c) for c in (False, True, True))
    net_module._GROUPS[forward_compiled] = functools.partial(net_module._inputs_then_forward, forward_compiled)
    rows = {}
    for name, net in (("eager", all_eager), ("windows eager, forward compiled", forward_compiled),
                      ("windows and forward compiled", one_graph)):
        run = functools.partial(net_module._group_params(net, batch.device), batch, segs, owner, tight)
        rows[f"relight windows + forward, {name}"] = {"operations": dispatched_from_python(run),
                                                      "segments": len(segs)}
    return rows


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
    groups.GROUP_COST_FLOPS["cpu"] = groups.GROUP_COST_FLOPS["accelerator"]  # group as on a GPU
    batched._warp_float = warp_segment  # loop: the accelerator's float warp, not the uint8 round trip
    rows = {}
    for name, layout in (("random", RandomLayout(scale=(0.5, 2.0))), ("sos", SOSLayout())):
        probe = CopyPaste(bank, layout=layout, num_pastes=(args.pastes, args.pastes))
        g = torch.Generator().manual_seed(0)
        segments = probe.fetch(args.batch, g)
        params = probe.draw_placements([(args.size, args.size)] * args.batch, targets, segments, g)
        pieces = sum(len(pl) for pl in params)
        table = piece_table(segments.rgba, params, args.size, args.size, args.pastes)
        grouped = groups.group_rows(table.ints, groups.GROUP_COST_FLOPS["accelerator"])
        cp = CopyPaste(bank, layout=layout, num_pastes=(args.pastes, args.pastes), backend="groups")
        for warp in ("loop", "groups"):
            with CountOps() as counter, (piece_by_piece() if warp == "loop" else contextlib.nullcontext()):
                cp.paste(images, targets, segments, params)
            rows[f"{name}, backend={warp}"] = {**counter.split(), "pieces": pieces,
                                             "groups": len(grouped) if warp == "groups" else pieces}
        if name == "random":
            rows.update(relight_rows(cp, images, targets, segments, params))
    info = {"machine": machine(), "batch": args.batch, "size": args.size, "pastes": args.pastes, "rows": rows}
    print(f"operations dispatched by one CopyPaste.paste, B={args.batch} at {args.size}², {args.pastes}/image")
    for k, v in rows.items():
        print(f"{k:22s} " + " ".join(f"{a}={b}" for a, b in v.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
