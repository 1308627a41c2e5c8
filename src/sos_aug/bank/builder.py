"""Build, extend and merge banks: streaming, parallel over processes, resumable and atomic.

While a build runs, everything goes to ``BANK/.partial/``: new shards, the new index records and a
``state.json`` checkpoint (units done, byte counts). A killed build resumes from the last checkpoint
when run again with the same arguments; bytes written after it are truncated away. The bank itself
changes only at the end, when ``meta.json`` is atomically replaced to name a new index generation.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..names import normalize_name
from ..ops.files import atomic_write_bytes, atomic_write_json
from .format import FORMAT_NAME, FORMAT_VERSION, INDEX_DTYPE, META_FILE, check_files, read_meta
from .sources import Item, Source, UnitResult

PARTIAL = ".partial"
SHARD_LIMIT = 4 << 30  # start a new shard file past 4 GiB
MAX_EXAMPLES = 20  # skip examples kept per reason in meta.json


class BankBuildError(RuntimeError):
    """Raised in ``strict`` mode on the first bad input; the message names the file or entry."""


def build_bank(
    out: str | Path,
    source: Source,
    workers: int = 1,
    strict: bool = False,
    checkpoint_every: int = 32,
    progress: bool = True,
    on_unit: Callable[[int], None] | None = None,
    ray_address: str | None = None,
) -> dict:
    """Add every segment of ``source`` to the bank at ``out`` (created if absent); returns a report.

    Rerunning after an interruption resumes; ``on_unit(n)`` is called after unit ``n`` is written
    (a hook for progress reporting, and for tests that kill a build at a known point). With
    ``ray_address`` (``"local"``, or a running cluster's address) the units are read and cut as Ray
    tasks; this process still writes them, in order, so the bank is the same as a local build's.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = read_meta(out) if (out / META_FILE).exists() else None
    if existing:
        check_files(out, existing)
    digest = _digest(source, existing)
    partial = _Partial(out / PARTIAL, digest, _generation(existing) + 1)
    todo = source.units[partial.state["units_done"] :]
    results = _run_on_ray(source.process, todo, ray_address, max(workers, 2)) if ray_address else \
        _run_units(source.process, todo, workers)
    bar = tqdm(total=len(source.units), initial=partial.state["units_done"], desc=f"bank {source.kind}",
               unit="unit", disable=not progress)
    last = time.monotonic()
    for result in results:
        if strict and result.skips:
            reason, what = result.skips[0]
            raise BankBuildError(f"{what}: {reason}")
        partial.add(result)
        bar.update(1)
        if on_unit is not None:
            on_unit(partial.state["units_done"])
        if partial.uncommitted >= checkpoint_every or time.monotonic() - last > 30:
            partial.checkpoint()
            last = time.monotonic()
    bar.close()
    partial.checkpoint()
    return _finalize(out, existing, partial, source)


def _run_units(process, units: list, workers: int) -> Iterable[UnitResult]:
    if workers <= 1 or len(units) <= 1:
        return map(process, units)
    pool = multiprocessing.get_context("fork").Pool(workers)
    return _closing(pool, pool.imap(process, units, chunksize=1))


def _run_on_ray(process, units: list, address: str, window: int) -> Iterable[UnitResult]:
    """The units as Ray tasks (each retried if its worker dies), results in unit order, at most
    ``window`` x 4 in flight so a 10M-segment source never sits in memory at once."""
    import ray  # an optional extra: pip install sos-aug[ray]

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    task = ray.remote(max_retries=3)(_process_unit)
    shared = ray.put(process)  # the source's reader, shipped once
    pending: list = []
    for unit in units:
        pending.append(task.remote(shared, unit))
        if len(pending) >= 4 * window:
            yield ray.get(pending.pop(0))
    for ref in pending:
        yield ray.get(ref)


def _process_unit(process, unit) -> UnitResult:
    """One unit through the source's reader (a plain function, as Ray tasks must be)."""
    return process(unit)


def _closing(pool, it):
    try:
        yield from it
    finally:
        pool.terminate()


class _Partial:
    """The resumable staging area: shards, index records and a checkpointed state file."""

    def __init__(self, root: Path, digest: str, generation: int):
        self.root = root
        state_path = root / "state.json"
        if state_path.exists():
            self.state = json.loads(state_path.read_text())
            if self.state["digest"] != digest:
                raise BankBuildError(
                    f"{root}: holds an interrupted build with other inputs or options; rerun that build "
                    f"to resume it, or delete {root} to start over"
                )
        else:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            self.state = {"digest": digest, "generation": generation, "units_done": 0, "records": 0,
                          "shards": [], "skips": {}, "examples": {}, "texts": []}
            atomic_write_json(state_path, self.state)
        self._truncate_to_checkpoint()
        self.records = open(root / "records.bin", "ab")
        self.shard = None
        self.uncommitted = 0
        self._text_index: dict[str, int] | None = None

    def _truncate_to_checkpoint(self) -> None:
        with open(self.root / "records.bin", "ab") as f:
            f.truncate(self.state["records"] * INDEX_DTYPE.itemsize)
        for s in self.state["shards"]:
            with open(self.root / s["file"], "ab") as f:
                f.truncate(s["bytes"])

    def _shard_for(self, nbytes: int):
        shards = self.state["shards"]
        if not shards or shards[-1]["bytes"] + nbytes > SHARD_LIMIT:
            name = f"shard-{self.state['generation']:04d}-{len(shards):04d}.bin"
            shards.append({"file": name, "bytes": 0})
            if self.shard:
                self.shard.close()
            self.shard = None
        if self.shard is None:
            self.shard = open(self.root / shards[-1]["file"], "ab")
        return len(shards) - 1, shards[-1]

    def add(self, result: UnitResult) -> None:
        recs = np.zeros(len(result.items), INDEX_DTYPE)
        for rec, item in zip(recs, result.items):
            k, shard = self._shard_for(len(item.blob))
            self.shard.write(item.blob)
            rec["offset"], rec["length"], rec["shard"] = shard["bytes"], len(item.blob), k
            shard["bytes"] += len(item.blob)
            rec["height"], rec["width"] = item.height, item.width
            rec["category"], rec["area"] = item.category, item.area
            rec["source_id"], rec["flags"] = item.source_id, item.flags
            rec["text"] = self._text_pointer(item)
        self.records.write(recs.tobytes())
        self.state["records"] += len(recs)
        for reason, what in result.skips:
            self.state["skips"][reason] = self.state["skips"].get(reason, 0) + 1
            examples = self.state["examples"].setdefault(reason, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(what)
        self.state["units_done"] += 1
        self.uncommitted += 1

    def _text_pointer(self, item: Item) -> int:
        """Index of the item's text record, shared by every segment with the same key."""
        if item.text_key is None:
            return -1
        keys = self.state["texts"]
        if self._text_index is None:  # rebuilt from the checkpointed list after a resume
            self._text_index = {k: i for i, k in enumerate(keys)}
        if item.text_key not in self._text_index:
            self._text_index[item.text_key] = len(keys)
            keys.append(item.text_key)
        return self._text_index[item.text_key]

    def checkpoint(self) -> None:
        """Make everything written so far durable, then record it; a crash rolls back to here."""
        for f in (self.records, self.shard):
            if f:
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(self.root / "state.json", self.state)
        self.uncommitted = 0

    def close(self) -> None:
        self.records.close()
        if self.shard:
            self.shard.close()


def _finalize(out: Path, existing: dict | None, partial: _Partial, source: Source) -> dict:
    """Publish the partial build as a new generation of the bank; meta.json is replaced last."""
    partial.close()
    state = partial.state
    new = np.fromfile(partial.root / "records.bin", dtype=INDEX_DTYPE)
    categories, cat_remap = _merge_categories(existing["categories"] if existing else [], source.categories)
    new["category"] = _remap(new["category"], cat_remap)
    old_texts = _read_texts(out, existing)
    new_texts = [source.texts[k] for k in state["texts"]]
    new["text"] = np.where(new["text"] >= 0, new["text"] + len(old_texts), -1)
    old_shards = existing["shards"] if existing else []
    new["shard"] += len(old_shards)
    for s in state["shards"]:
        os.replace(partial.root / s["file"], out / s["file"])
    report = {
        "kind": source.kind, "source": source.description, "added": int(len(new)),
        "skipped": state["skips"], "skipped_examples": state["examples"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _publish(out, existing, _old_index(out, existing), new, categories, old_shards + state["shards"],
             old_texts + new_texts, report, state["generation"])
    shutil.rmtree(partial.root, ignore_errors=True)
    return report


def _publish(out, existing, old_index, new_index, categories, shards, texts, report, generation) -> None:
    index_name, texts_name = f"index-{generation:04d}.bin", f"texts-{generation:04d}.json"
    atomic_write_bytes(out / index_name, old_index.tobytes() + new_index.tobytes())
    atomic_write_json(out / texts_name, texts)
    provenance = (existing["provenance"] if existing else []) + [report]
    skipped = Counter()
    for p in provenance:
        skipped.update(p.get("skipped", {}))
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "generation": generation,
        "num_segments": int(len(old_index) + len(new_index)), "index": index_name, "texts": texts_name,
        "index_record_bytes": INDEX_DTYPE.itemsize, "shards": shards, "categories": categories,
        "skipped": dict(skipped), "provenance": provenance,
    }
    atomic_write_json(out / META_FILE, meta)
    for stale in (existing or {}).get("index"), (existing or {}).get("texts"):
        if stale and stale not in (index_name, texts_name):
            (out / stale).unlink(missing_ok=True)


def merge_banks(out: str | Path, others: list[str | Path], progress: bool = True) -> dict:
    """Add every segment of the banks ``others`` to ``out``: shards are hard-linked (or copied), the
    index and category table are merged by category name; no shard of ``out`` is rewritten."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for other in tqdm([Path(o) for o in others], desc="merge", disable=not progress):
        existing = read_meta(out) if (out / META_FILE).exists() else None
        if existing and (out / PARTIAL).exists():
            raise BankBuildError(f"{out / PARTIAL}: finish or delete the interrupted build first")
        meta = read_meta(other)
        check_files(other, meta)
        generation = _generation(existing) + 1
        index = np.fromfile(other / meta["index"], dtype=INDEX_DTYPE)
        categories, remap = _merge_categories(existing["categories"] if existing else [], meta["categories"])
        index["category"] = _remap(index["category"], remap)
        old_texts = _read_texts(out, existing)
        index["text"] = np.where(index["text"] >= 0, index["text"] + len(old_texts), -1)
        old_shards = existing["shards"] if existing else []
        index["shard"] += len(old_shards)
        shards = []
        for k, s in enumerate(meta["shards"]):
            name = f"shard-{generation:04d}-{k:04d}.bin"
            _link_or_copy(other / s["file"], out / name)
            shards.append({"file": name, "bytes": s["bytes"]})
        report = {"kind": "merge", "source": {"bank": str(other)}, "added": int(len(index)), "skipped": {},
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _publish(out, existing, _old_index(out, existing), index, categories, old_shards + shards,
                 old_texts + _read_texts(other, meta), report, generation)
        reports.append(report)
    return {"merged": reports}


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _merge_categories(old: list[dict], incoming: list[dict]) -> tuple[list[dict], dict[int, int]]:
    """Unify category tables by name (and synonyms); incoming ids keep their value when free."""
    cats = [dict(c) for c in old]
    by_name = {}
    for c in cats:
        for n in [c["name"], *c.get("synonyms", [])]:
            by_name.setdefault(normalize_name(n), c["id"])
    used = {c["id"] for c in cats}
    remap = {}
    for c in incoming:
        hit = next((by_name[normalize_name(n)] for n in [c["name"], *c.get("synonyms", [])]
                    if normalize_name(n) in by_name), None)
        if hit is None:
            hit = c["id"] if c["id"] not in used else max(used | {0}) + 1
            cats.append({**c, "id": hit})
            used.add(hit)
            by_name[normalize_name(c["name"])] = hit
        remap[c["id"]] = hit
    return cats, remap


def _remap(values: np.ndarray, remap: dict[int, int]) -> np.ndarray:
    """Map category ids through ``remap`` in one pass (a lookup table, not a pass per category)."""
    if all(k == v for k, v in remap.items()) or len(values) == 0:
        return values
    table = np.arange(max(int(values.max()), max(remap)) + 1, dtype=values.dtype)
    table[list(remap)] = list(remap.values())
    return table[values]


def _old_index(out: Path, existing: dict | None) -> np.ndarray:
    if not existing or not existing["num_segments"]:
        return np.zeros(0, INDEX_DTYPE)
    return np.fromfile(out / existing["index"], dtype=INDEX_DTYPE)


def _read_texts(root: Path, meta: dict | None) -> list:
    if not meta or not meta.get("texts"):
        return []
    return json.loads((root / meta["texts"]).read_text())


def _generation(meta: dict | None) -> int:
    return meta["generation"] if meta else 0


def _digest(source: Source, existing: dict | None) -> str:
    """Identify a build by its inputs, options and the bank generation it extends."""
    key = json.dumps([source.kind, source.description, len(source.units), _generation(existing)],
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
