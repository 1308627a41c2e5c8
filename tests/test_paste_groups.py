"""The grouped warp (all pieces of a batch resized in a few batched matmuls) against torch's own
antialiased resize, piece by piece, on real bank segments; and how it groups."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sos_aug.layout import Placement
from sos_aug.ops.buffers import flat_base
from sos_aug.ops.resize import warp_segment
from sos_aug.paste.geometry import Col, clip_window, piece_table
from sos_aug.paste.groups import DENSE_LIMIT, GROUP_BYTES, _group_bytes, _group_flops, group_rows, warp_groups
from sos_aug.segments import PasteSegments


def draw_pieces(bank, seed: int, count: int, height: int, width: int) -> tuple[list[torch.Tensor], Placement]:
    """``count`` real segments and one image's placement: sizes from 1/8x to 3x native (a tenth of
    sides one pixel), some boxes hanging off the canvas, about half flipped."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(bank), (count,), generator=g).tolist()
    segments = PasteSegments.pack([bank.read_rgba(r)[0] for r in rows])
    boxes = []
    for seg in segments:
        scale = float(torch.empty(1).uniform_(0.125, 3.0, generator=g))
        h, w = (max(1, round(s * scale)) for s in seg.shape[-2:])
        h, w = (1 if torch.rand(1, generator=g) < 0.1 else v for v in (h, w))  # one-pixel strips too
        y0 = int(torch.randint(-h // 2, height, (1,), generator=g))
        x0 = int(torch.randint(-w // 2, width, (1,), generator=g))
        boxes.append([x0, y0, x0 + w, y0 + h])
    flip = torch.rand(count, generator=g) < 0.5
    return segments, Placement(torch.tensor(boxes, dtype=torch.float32), torch.arange(count), flip,
                               torch.zeros(count))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 12), size=st.sampled_from([(96, 128), (240, 180)]),
       group_cost=st.sampled_from([0.0, 3e7, 1e15]), dense_limit=st.sampled_from([DENSE_LIMIT, 1e5, -1.0]),
       device=st.sampled_from(DEVICES))
@example(seed=55345, count=1, size=(96, 128), group_cost=0.0, dense_limit=DENSE_LIMIT, device="cpu")  # off canvas
def test_grouped_warp_equals_torch_resize_piece_by_piece(train_bank, seed, count, size, group_cost, dense_limit,
                                                         device):
    """Every piece, whether resized in a group by matmuls or alone by torch's kernel (over
    ``dense_limit``), equals torch's CPU resize of that piece alone, flipped and cropped; on a
    CUDA device too when there is one."""
    height, width = size
    segments, placement = draw_pieces(train_bank, seed, count, height, width)
    on_device = [s.to(device) for s in segments]
    torch.set_float32_matmul_precision("high")  # a caller's TF32 setting must not reach the warp
    try:
        groups = warp_groups(flat_base(on_device), on_device, [placement], height, width, count, group_cost,
                             dense_limit)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    seen = set()
    for t, pieces in groups:
        for row, piece in zip(t.tolist(), pieces):
            assert row[Col.TOP_AT] == 0
            k = row[Col.SLOT1] - 1
            seen.add(k)
            x0, y0, x1, y1 = (int(v) for v in placement.boxes[k])
            want = warp_segment(segments[k].float(), y1 - y0, x1 - x0, bool(placement.flip[k]), 0.0)
            crop, _ = clip_window(placement.boxes[k].tolist(), y1 - y0, x1 - x0, height, width)
            want = want[(slice(None), *crop)]
            got = piece[:, : row[Col.HC], : row[Col.WC]].cpu()
            assert got.shape == want.shape
            # 0..255 scale: float rounding only (torch's CUDA kernel, used alone over dense_limit,
            # differs from its CPU kernel by up to 3e-3; its CUDA and CPU kernels themselves by up to
            # ~8e-3, measured on an H100)
            assert (got - want).abs().max() < (2e-3 if device == "cpu" else 1e-2)
    on_canvas = {k for k in range(count) if clip_window(placement.boxes[k].tolist(),
                                                         int(placement.boxes[k, 3] - placement.boxes[k, 1]),
                                                         int(placement.boxes[k, 2] - placement.boxes[k, 0]),
                                                         height, width) is not None}
    assert seen == on_canvas


def test_groups_cover_every_piece_once_within_the_memory_cap(train_bank):
    segments, placement = draw_pieces(train_bank, 3, 40, 1024, 1024)
    rows = piece_table(segments, [placement], 1024, 1024, 40).ints
    for cost in (0.0, 1e10, float("inf")):
        groups = group_rows(rows, cost)
        assert sorted(r for grp in groups for r in grp) == list(range(len(rows)))
        for grp in groups:
            sizes = [max(rows[r][c] for r in grp) for c in (Col.HS, Col.WS, Col.HC, Col.WC)]
            assert len(grp) == 1 or _group_bytes(len(grp), *sizes) <= GROUP_BYTES
    assert len(group_rows(rows, 0.0)) > len(group_rows(rows, float("inf")))
    sizes_of = [[row[c] for c in (Col.HS, Col.WS, Col.HC, Col.WC)] for row in rows]
    big = [r for r in range(len(rows)) if _group_flops(1, *sizes_of[r]) > 1e8]
    assert big and all(len(grp) == 1 for grp in group_rows(rows, float("inf"), 1e8) if set(grp) & set(big))


def test_float_resize_to_one_pixel_wide_is_right(train_bank):
    """torch's float antialiased kernel (2.14, CPU) repeats the first row when the output is one pixel
    wide; the float warp works around it. Checked against the uint8 kernel, which is right there."""
    tallest = int(train_bank.index["height"].argmax())
    segment = torch.tensor(train_bank.read_rgba(tallest)[0])
    for height in (2, 7, 40):
        as_float = warp_segment(segment.float(), height, 1, False, 0.0)
        as_uint8 = warp_segment(segment, height, 1, False, 0.0)
        assert as_float.shape == as_uint8.shape == (4, height, 1)
        assert (as_float - as_uint8.float()).abs().max() <= 1.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 78), width=st.sampled_from([8, 640, 1024, 2040, 2048, 1023, 999]),
       offset=st.integers(0, 9))
def test_packed_row_counts_equal_a_plain_sum(val_set, pick, width, offset):
    """The accelerator path counts mask pixels eight columns per int64 (no int32 copy of the stack):
    on real masks, widened or cropped to widths that pack (multiples of 8 up to 2040) and that do
    not, and as views starting anywhere in a row, it equals a plain sum, and so do the boxes."""
    from sos_aug.ops.masks import counts_and_boxes, row_counts, tight_boxes

    _, target = val_set[pick]
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    canvas = torch.zeros(len(masks), masks.shape[1], width + offset, dtype=torch.bool)
    w = min(width, masks.shape[2])
    canvas[:, :, offset : offset + w] = masks[:, :, :w]
    canvas[:, -1] = True  # a full row: each byte lane counts width / 8 pixels, the most it can carry
    view = canvas[:, :, offset:]  # packs only where the view starts on an 8-byte boundary
    want = view.sum(2, dtype=torch.int32)
    assert torch.equal(row_counts(view.view(torch.uint8)), want)
    counts, boxes = counts_and_boxes(view)
    assert torch.equal(counts, want.sum(1).long()) and torch.equal(boxes, tight_boxes(view))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 78), row=st.integers(0, 40), crop=st.tuples(st.integers(0, 200), st.integers(0, 200)),
       device=st.sampled_from(DEVICES))
def test_mask_stats_equal_torchcounts_and_boxes(val_set, pick, row, crop, device):
    """The per-image path's host-side bookkeeping (NumPy views on the CPU, one reduction elsewhere)
    on real masks, whole and as windows (strided views), empty ones included."""
    from sos_aug.ops.masks import mask_stats, tight_boxes

    _, target = val_set[pick]
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    mask = masks[row % len(masks)]
    for m in (mask, mask[crop[0] : crop[0] + 120, crop[1] : crop[1] + 90], torch.zeros_like(mask)):
        count, box = mask_stats(m.to(device))
        assert count == int(m.sum()) and box == [int(v) for v in tight_boxes(m[None])[0].tolist()]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.integers(0, 700), height=st.integers(1, 300), width=st.integers(1, 300), device=st.sampled_from(DEVICES))
def test_resize_by_weights_equals_torch_resize(train_bank, row, height, width, device):
    """The weight-matrix resize (what a device whose own kernel refuses a large downscale falls back
    to; CUDA's does for one-pixel strips of large segments) against torch's CPU kernel."""
    from sos_aug.ops.resize import resize_by_weights

    segment = torch.tensor(train_bank.read_rgba(row % len(train_bank))[0]).float()
    want = warp_segment(segment, height, width, False, 0.0)
    got = resize_by_weights(segment.to(device), height, width).cpu()
    assert got.shape == want.shape
    assert (got - want).abs().max() < (2e-3 if device == "cpu" else 1e-2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.integers(0, 700), height=st.integers(1, 400), width=st.integers(1, 400))
def test_uint8_warp_is_torchvisions_resize(train_bank, row, height, width):
    """The per-image path calls torch's uint8 antialiased kernel directly: the same pixels as
    torchvision's ``F.resize`` (which wraps it), one-pixel strips included."""
    from torchvision.transforms.v2 import functional as F

    segment = torch.tensor(train_bank.read_rgba(row % len(train_bank))[0])
    assert torch.equal(warp_segment(segment, height, width, False, 0.0),
                       F.resize(segment, [height, width], antialias=True))
