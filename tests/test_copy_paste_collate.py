"""CopyPasteCollate in real DataLoader workers: reproducible per seed, different per worker."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from sos_aug import CopyPaste, CopyPasteCollate, SOSLayout


def run(dataset, cp, seed, defer=False):
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=CopyPasteCollate(cp, defer=defer),
                        generator=torch.Generator().manual_seed(seed))
    return list(loader)


def test_two_workers_reproducible_and_distinct(train_bank, val_set):
    cp = CopyPaste(train_bank, layout=SOSLayout(), num_pastes=(2, 6))
    same_image = Subset(val_set, [3] * 8)  # identical inputs everywhere: only the draws differ
    a, b = run(same_image, cp, seed=11), run(same_image, cp, seed=11)
    assert len(a) == 4
    for (ia, ta), (ib, tb) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))
        assert all(torch.equal(x["pasted_rows"], y["pasted_rows"]) and torch.equal(x["boxes"], y["boxes"])
                   for x, y in zip(ta, tb))
    # batches 0 and 1 come from workers 0 and 1
    rows0 = [t["pasted_rows"].tolist() for t in a[0][1]]
    rows1 = [t["pasted_rows"].tolist() for t in a[1][1]]
    assert rows0 != rows1
    c = run(same_image, cp, seed=12)
    assert [t["pasted_rows"].tolist() for t in c[0][1]] != rows0


def test_deferred_mode_ships_segments_and_pastes_later(train_bank, val_set):
    cp = CopyPaste(train_bank, num_pastes=(3, 3))
    batches = run(Subset(val_set, [0, 1, 2, 3]), cp, seed=0, defer=True)
    images, targets, segments = batches[0]
    assert len(segments.rgba) == 6 and segments.image.tolist() == [0, 0, 0, 1, 1, 1]
    out_images, out_targets = cp(list(images), list(targets), segments=segments,
                                 generator=torch.Generator().manual_seed(0))
    assert all(int(t["is_pasted"].sum()) <= 3 for t in out_targets)
    assert any(int(t["is_pasted"].sum()) > 0 for t in out_targets)
    # the worker drew the layout too; pasting later (batched, as on a GPU) follows it: the same
    # instances, masks apart on a piece's border pixels (the grouped warp resizes in float)
    assert segments.placements is not None and len(segments.placements) == 2
    again_images, again_targets = CopyPaste(train_bank, num_pastes=(3, 3), backend="groups")(
        list(images), list(targets), segments=segments)
    for ta, tb in zip(out_targets, again_targets):
        assert torch.equal(ta["labels"], tb["labels"]) and torch.equal(ta["is_pasted"], tb["is_pasted"])
        assert ((ta["masks"] ^ tb["masks"]).flatten(1).sum(1) <= 0.02 * ta["masks"].flatten(1).sum(1) + 4).all()
    # images resized after the worker drew the layout: a clear error, not a layout for another size
    small = [im[:, :100, :100] for im in images]
    small_targets = [{**t, "masks": t["masks"][:, :100, :100]} for t in targets]
    with pytest.raises(ValueError, match="drawn for images of sizes"):
        cp(small, small_targets, segments=segments)


def test_segments_travel_as_one_buffer(train_bank):
    import pickle

    cp = CopyPaste(train_bank, num_pastes=(4, 4))
    segments = cp.fetch(3, torch.Generator().manual_seed(5))
    payload = sum(r.numel() for r in segments.rgba)
    blob = pickle.dumps(segments)
    assert len(blob) < 1.1 * payload + 20_000  # not one copy of the buffer per segment
    back = pickle.loads(blob)
    assert all(torch.equal(a, b) for a, b in zip(segments.rgba, back.rgba))
    moved = segments.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(segments.rgba, moved.rgba))


def worker_allocator_state(batch):
    """A collate_fn run after CopyPaste in the worker: reports whether the worker kept freed memory."""
    from sos_aug import allocator

    return [allocator.applied]


@pytest.mark.parametrize("keep", [True, False])
def test_workers_keep_freed_memory_and_the_main_process_is_left_alone(train_bank, val_set, keep):
    from sos_aug import allocator

    cp = CopyPaste(train_bank, num_pastes=(1, 2))
    collate = CopyPasteCollate(cp, collate_fn=worker_allocator_state, keep_freed_memory=keep)
    loader = DataLoader(Subset(val_set, [0, 1, 2, 3]), batch_size=2, num_workers=2, collate_fn=collate,
                        multiprocessing_context="spawn")  # fresh processes: nothing inherited from this one
    glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    assert [flag for (flag,) in loader] == [keep and glibc] * 2
    main_before = allocator.applied
    collate([val_set[0]])  # in the main process: its allocator is the user's
    assert allocator.applied == main_before


FREED_STAYS = """
import ctypes, sys, torch
from sos_aug.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2()
tensors = [torch.ones(12 << 20, dtype=torch.uint8) for _ in range(4)]  # 48 MB in 12 MB tensors
mapped = libc.mallinfo2().hblkhd - before.hblkhd
del tensors
print(mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")),
                    reason="glibc >= 2.33 (mallinfo2) needed to look at the heap")
def test_keep_freed_memory_serves_batches_from_the_heap_and_keeps_them():
    """In a fresh process: by default glibc maps 12 MB tensors on their own and unmaps them when freed;
    after keep_freed_memory() they come from the heap and stay there, free, for the next batch."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", FREED_STAYS, mode], capture_output=True, text=True, check=True)
        return [int(x) for x in out.stdout.split()]

    mapped, kept = run("default")
    assert mapped >= 12 and kept < 48  # the control: without it, at least one tensor was mapped on its own
    mapped, kept = run("keep")
    assert mapped == 0 and kept >= 48


@pytest.mark.parametrize("warm_up", [True, False])
def test_workers_forked_after_the_warm_up_relight_without_compiling(train_bank, val_set, warm_up):
    """CopyPasteCollate compiles the relighters' CPU code in the training process (the net's pixel
    loop; its forward with ``compile_cpu=True``, at one thread as workers run): a worker forked from
    it relights real images without compiling anything. Without the warm-up, the worker compiles."""
    from torch._dynamo.utils import counters

    from sos_aug.relight import RelightNet, cpu_kernel

    torch._dynamo.reset()  # nothing compiled by earlier tests: only the warm-up may have compiled
    cp = CopyPaste(train_bank, num_pastes=(4, 4), relight=RelightNet.pretrained(compile_cpu=True))
    collate = CopyPasteCollate(cp, warm_up=warm_up)
    assert not warm_up or cpu_kernel.relight_image.signatures  # the pixel loop compiled (or loaded from cache)

    def relight_counting_graphs(batch):
        before, loops_ready = counters["stats"]["unique_graphs"], bool(cpu_kernel.relight_image.signatures)
        images, targets = collate(batch)
        return targets, counters["stats"]["unique_graphs"] - before, loops_ready

    loader = DataLoader(Subset(val_set, [0, 1, 2, 3]), batch_size=2, num_workers=1,
                        collate_fn=relight_counting_graphs, multiprocessing_context="fork")
    new_graphs = []
    for targets, graphs, loops_ready in loader:
        assert any(t["is_pasted"].any() for t in targets)
        assert loops_ready or not warm_up
        new_graphs.append(graphs)
    assert (sum(new_graphs) == 0) == warm_up
