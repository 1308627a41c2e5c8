"""``SegmentBank``: a memory-mapped, lazily opened segment store exposed as a torch ``Dataset``."""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..names import name_forms, normalize_name
from .format import (
    FLAG_NAMES,
    FLAG_UNKNOWN,
    INDEX_DTYPE,
    BankFormatError,
    check_files,
    decode_segment,
    read_meta,
    segment_source,
)
from .sources import load_coco

SAMPLING_MODES = ("uniform", "category_balanced", "repeat_factor")


@dataclass
class Segment:
    """One object segment: ``rgba`` is a (4, h, w) uint8 tensor whose alpha is the object's mask."""

    rgba: torch.Tensor
    category_id: int
    category: str
    text: dict = field(default_factory=dict)
    source: str = ""
    flags: dict = field(default_factory=dict)


class _OpenFiles:
    """The per-process file handles of a bank; never pickled, reopened on first use in each worker."""

    def __init__(self, root: Path, meta: dict):
        self.index = np.memmap(root / meta["index"], dtype=INDEX_DTYPE, mode="r") if meta["num_segments"] else (
            np.zeros(0, INDEX_DTYPE)
        )
        self.shard_paths = [root / s["file"] for s in meta["shards"]]
        self._maps: dict[int, mmap.mmap] = {}

    def shard(self, k: int) -> mmap.mmap:
        if k not in self._maps:
            with open(self.shard_paths[k], "rb") as f:
                self._maps[k] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[k]


class SegmentBank(Dataset):
    """A directory of object segments (see :mod:`sos_aug.bank.format`) as a ``Dataset``.

    ``bank[i]`` decodes segment ``i`` into a :class:`Segment`. Views made by :meth:`subset` share the
    memory map and hold only their row numbers. The object pickles cheaply (path + rows), so it can go
    to DataLoader workers and DDP ranks; each process opens the files on first access.
    """

    def __init__(self, path: str | Path, sampling: str = "uniform", t: float = 0.001,
                 reference: str | Path | None = None):
        """``sampling`` is the mode :meth:`sample` draws under; ``t`` and ``reference`` are the
        repeat-factor threshold and the training set it is measured on (see :meth:`sampling_weights`)."""
        self.root = Path(path)
        self.meta = read_meta(self.root)
        check_files(self.root, self.meta)
        self._rows: np.ndarray | None = None  # None means every row
        self._files: _OpenFiles | None = None
        self._texts: list | None = None
        self._cdf: torch.Tensor | None = None
        self.sampling = _check_mode(sampling)
        self.categories = {c["id"]: c for c in self.meta["categories"]}
        self.t = t
        # f_c measured once here (a small dict that pickles to the workers), not per worker
        self.reference_freq = None if reference is None else reference_frequencies(self.categories, reference)

    # -- pickling: ship the path and the rows, reopen in the worker -------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_files=None, _texts=None, _cdf=None)
        return state

    @property
    def index(self) -> np.ndarray:
        """The index records of this view (a memory-mapped array, or a gather of it for views)."""
        full = self._open().index
        return full if self._rows is None else full[self._rows]

    def _open(self) -> _OpenFiles:
        if self._files is None:
            self._files = _OpenFiles(self.root, self.meta)
        return self._files

    def __len__(self) -> int:
        return self.meta["num_segments"] if self._rows is None else len(self._rows)

    def _row(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"segment {i} out of range for a bank view of {n}")
        i = i % n
        return i if self._rows is None else int(self._rows[i])

    def root_row(self, i: int) -> int:
        """Segment ``i`` of this view as a row of the whole bank (for provenance)."""
        return self._row(i)

    def _blob(self, i: int) -> tuple[memoryview, str]:
        """Segment ``i``'s encoded bytes in its shard, and where they are (for error messages)."""
        files = self._open()
        rec = files.index[self._row(i)]
        shard_no = int(rec["shard"])
        start, length = int(rec["offset"]), int(rec["length"])
        buf = files.shard(shard_no)
        if start + length > len(buf):
            raise BankFormatError(f"{files.shard_paths[shard_no]}: truncated, segment at byte {start} is cut off")
        return memoryview(buf)[start : start + length], f"{files.shard_paths[shard_no]} at byte {start}"

    def read_rgba(self, i: int) -> tuple[np.ndarray, str]:
        """Decode segment ``i`` of this view: ((4, h, w) uint8 array, source string)."""
        return decode_segment(*self._blob(i))

    def source(self, i: int) -> str:
        """Segment ``i``'s source string, from its header alone (no pixels decoded)."""
        return segment_source(*self._blob(i))

    def __getitem__(self, i: int) -> Segment:
        rec = self._open().index[self._row(i)]
        pixels, source = self.read_rgba(i)
        cat = int(rec["category"])
        flags = {n: int(v) for n, v in zip(FLAG_NAMES, rec["flags"]) if v != FLAG_UNKNOWN}
        return Segment(
            rgba=torch.from_numpy(pixels.copy()),
            category_id=cat,
            category=self.categories[cat]["name"],
            text=self.text(int(rec["text"])),
            source=source,
            flags=flags,
        )

    def text(self, pointer: int) -> dict:
        """The text record a segment points to (empty when it has none)."""
        if pointer < 0:
            return {}
        if self._texts is None:
            name = self.meta.get("texts")
            self._texts = json.loads((self.root / name).read_text()) if name else []
        return self._texts[pointer]

    # -- views ------------------------------------------------------------------------------------
    def subset(
        self,
        categories: Sequence[int | str] | None = None,
        min_area: int | None = None,
        max_area: int | None = None,
        min_flags: dict[str, int] | None = None,
    ) -> SegmentBank:
        """A view of the segments that pass every given filter; no pixel data is touched."""
        index = self.index
        keep = np.ones(len(index), bool)
        if categories is not None:
            ids = {self.category_id(c) for c in categories}
            keep &= np.isin(index["category"], np.fromiter(ids, np.int64, len(ids)))
        if min_area is not None:
            keep &= index["area"] >= min_area
        if max_area is not None:
            keep &= index["area"] <= max_area
        for name, level in (min_flags or {}).items():
            if name not in FLAG_NAMES:
                raise ValueError(f"unknown quality flag {name!r}; known: {FLAG_NAMES}")
            col = index["flags"][:, FLAG_NAMES.index(name)]
            keep &= (col != FLAG_UNKNOWN) & (col >= level)
        return self._view(np.flatnonzero(keep))

    def _view(self, local_rows: np.ndarray) -> SegmentBank:
        view = object.__new__(SegmentBank)
        view.__dict__.update(self.__getstate__())
        base = np.arange(self.meta["num_segments"]) if self._rows is None else self._rows
        view._rows = base[local_rows]
        view._files = self._files
        return view

    def category_id(self, category: int | str) -> int:
        """Resolve a category id or name (or synonym) to this bank's id."""
        if isinstance(category, (int, np.integer)):
            if int(category) not in self.categories:
                raise KeyError(f"category id {category} is not in bank {self.root}")
            return int(category)
        key = normalize_name(category)
        for cid, c in self.categories.items():
            if key == normalize_name(c["name"]) or key in {normalize_name(s) for s in c.get("synonyms", [])}:
                return cid
        raise KeyError(f"category {category!r} is not in bank {self.root}")

    def category_counts(self) -> dict[int, int]:
        ids, counts = np.unique(self.index["category"], return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts)}

    # -- sampling ---------------------------------------------------------------------------------
    def sampling_weights(self, mode: str = "uniform", t: float | None = None,
                         reference: str | Path | None = None) -> torch.Tensor:
        """Per-segment weights for ``WeightedRandomSampler``.

        ``uniform``: every segment alike. ``category_balanced``: every category gets equal total mass.
        ``repeat_factor``: LVIS's r_c = max(1, sqrt(t / f_c)). With ``reference`` (a COCO/LVIS
        instances file: the training set), f_c is the fraction of that file's images holding category
        c, so a bank without source images (one segment per generated image) still favours what is
        rare where it is pasted; without it, f_c is measured on the bank's own source images (of
        segments, where the source image is unknown). ``t`` and ``reference`` default to the bank's.
        """
        index = self.index
        cats = index["category"].astype(np.int64)
        t = self.t if t is None else t
        if _check_mode(mode) == "uniform" or len(index) == 0:
            return torch.ones(len(index), dtype=torch.float64)
        counts = np.bincount(cats)  # category ids are small non-negative ints
        if mode == "category_balanced":
            return torch.from_numpy(1.0 / counts[cats])
        ref = reference_frequencies(self.categories, reference) if reference is not None else self.reference_freq
        if ref is not None:
            freq = np.full(len(counts), np.inf)  # a category the training set lacks: r_c = 1
            for cid, f in ref.items():
                if cid < len(freq):
                    freq[cid] = f
        else:
            freq = self._own_frequencies(cats, counts)
        with np.errstate(divide="ignore"):
            repeat = np.maximum(1.0, np.sqrt(t / freq))
        return torch.from_numpy(repeat[cats])

    def _own_frequencies(self, cats: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """f_c over the bank's own source images: distinct (category, image) pairs per image."""
        src = self.index["source_id"].astype(np.int64)
        if (src >= 0).all():  # one int64 key per (category, image) pair
            pairs = _distinct(cats * (int(src.max()) + 1) + src)
            per_cat_images = np.bincount(pairs // (int(src.max()) + 1), minlength=len(counts))
            return per_cat_images / len(_distinct(src))
        return counts / len(cats)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` view positions (with replacement) under this view's sampling mode; O(n log N)."""
        if len(self) == 0:
            raise ValueError(f"cannot sample from an empty view of bank {self.root}")
        if self._cdf is None:
            cdf = torch.cumsum(self.sampling_weights(self.sampling), 0)
            self._cdf = cdf / cdf[-1]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.searchsorted(self._cdf, u, right=True).clamp_(max=len(self) - 1)

    def with_sampling(self, mode: str, t: float | None = None, reference: str | Path | None = None) -> SegmentBank:
        """The same segments, drawn under another sampling mode (and repeat-factor settings)."""
        view = self._view(np.arange(len(self)))
        view.sampling = _check_mode(mode)
        view.t = self.t if t is None else t
        if reference is not None:
            view.reference_freq = reference_frequencies(self.categories, reference)
        return view

    def info(self) -> dict:
        counts = self.category_counts()
        return {
            "path": str(self.root),
            "num_segments": len(self),
            "num_categories": len(counts),
            "categories": [
                {"id": cid, "name": self.categories[cid]["name"], "count": counts[cid]} for cid in sorted(counts)
            ],
            "bytes": sum(s["bytes"] for s in self.meta["shards"]),
            "skipped": self.meta.get("skipped", {}),
        }

    def __repr__(self) -> str:
        return f"SegmentBank({str(self.root)!r}, segments={len(self)}, categories={len(self.categories)})"


def reference_frequencies(categories: dict[int, dict], reference: str | Path) -> dict[int, float]:
    """Bank category id -> f_c, the fraction of the reference file's images that hold category c.

    Categories are matched by id where the reference's category of that id has the same name (or
    a synonym), else by name and synonyms (COCO's names match LVIS's, :mod:`sos_aug.names`); a bank
    category the reference lacks gets no entry (r_c = 1). A matched category with no image counts as
    in one image (its largest r_c)."""
    data = load_coco(reference)
    images = {a["image_id"] for a in data["annotations"]} | {im["id"] for im in data["images"]}
    per_cat: dict[int, set] = {}
    for a in data["annotations"]:
        per_cat.setdefault(a["category_id"], set()).add(a["image_id"])
    ref_cats = {c["id"]: c for c in data["categories"]}
    by_name = {}
    for c in data["categories"]:
        for name in [c["name"], *c.get("synonyms", [])]:
            by_name.setdefault(normalize_name(name), c["id"])
    out = {}
    for cid, cat in categories.items():
        names = name_forms([cat["name"], *cat.get("synonyms", [])])
        same = cid in ref_cats and set(names) & {normalize_name(n) for n in
                                                 [ref_cats[cid]["name"], *ref_cats[cid].get("synonyms", [])]}
        ref_id = cid if same else next((by_name[n] for n in names if n in by_name), None)
        if ref_id is not None:
            out[cid] = max(len(per_cat.get(ref_id, ())), 1) / max(len(images), 1)
    if not out:
        raise ValueError(f"{reference}: none of the bank's categories is in this file (matched by id, name and "
                         "synonyms); is it the training set's instances file?")
    return out


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + compare: several times faster than np.unique on 1M ints)."""
    v = np.sort(values)
    return v[np.concatenate([[True], v[1:] != v[:-1]])] if len(v) else v


def _check_mode(mode: str) -> str:
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose one of {SAMPLING_MODES}")
    return mode
