"""On-disk layout of a segment bank: the fixed-size index record, the segment codec, meta.json.

A bank is a directory::

    meta.json            format version, categories, shard list, provenance (written last, atomically)
    index-GGGG.bin       one 48-byte record per segment (numpy structured array, little endian)
    texts-GGGG.json      optional text records shared by segments (SOS description/short_phrase/features)
    shard-GGGG-KKKK.bin  encoded RGBA segments back to back

``meta.json`` names the index and texts files of the current generation ``GGGG``; a new generation is
written beside the old one and only becomes visible when ``meta.json`` is replaced, so a reader never
sees a half-written bank.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import zstandard

FORMAT_NAME = "sos-aug-bank"
FORMAT_VERSION = 1
META_FILE = "meta.json"
FLAG_NAMES = ("IsInstance", "Integrity", "QualityAndRegularity")
FLAG_UNKNOWN = 255

#: One record per segment. 48 bytes; ``shard``/``offset``/``length`` locate the encoded blob.
INDEX_DTYPE = np.dtype(
    [
        ("offset", "<u8"),
        ("source_id", "<i8"),
        ("length", "<u4"),
        ("category", "<i4"),
        ("area", "<u4"),
        ("text", "<i4"),
        ("shard", "<u2"),
        ("height", "<u2"),
        ("width", "<u2"),
        ("flags", "u1", (3,)),
        ("_pad", "u1", (7,)),
    ]
)
assert INDEX_DTYPE.itemsize == 48

_HEADER = struct.Struct("<4sHHH")  # magic, height, width, source length
_MAGIC = b"SEG1"
_compressor = zstandard.ZstdCompressor(level=3)
_decompressor = zstandard.ZstdDecompressor()


class BankFormatError(RuntimeError):
    """A bank file is missing, truncated or not of this format; the message names the file."""


def encode_segment(rgba: np.ndarray, source: str) -> bytes:
    """Encode a (4, h, w) uint8 planar RGBA array with its source string.

    Planar raw bytes compressed with zstd: about PNG's size, and several times faster to decode,
    which is what a DataLoader worker pays on every read.
    """
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[0] != 4:
        raise ValueError(f"expected a (4, h, w) uint8 array, got {rgba.dtype} {rgba.shape}")
    src = source.encode("utf-8")[:65535]
    header = _HEADER.pack(_MAGIC, rgba.shape[1], rgba.shape[2], len(src))
    return header + src + _compressor.compress(np.ascontiguousarray(rgba).tobytes())


def _header(blob: bytes | memoryview) -> tuple[int, int, int, str]:
    """Height, width, source length and source string of an encoded segment (no pixels decoded)."""
    magic, h, w, n = _HEADER.unpack_from(blob, 0)
    if magic != _MAGIC:
        raise ValueError("bad magic")
    return h, w, n, bytes(blob[_HEADER.size : _HEADER.size + n]).decode("utf-8")


def segment_source(blob: bytes | memoryview, where: str = "") -> str:
    """The source string of an encoded segment, read from its header only."""
    try:
        return _header(blob)[3]
    except (ValueError, struct.error) as err:
        raise BankFormatError(f"corrupt segment in {where}: {err}") from err


def decode_segment(blob: bytes | memoryview, where: str = "") -> tuple[np.ndarray, str]:
    """Decode a blob written by :func:`encode_segment` into ((4, h, w) uint8, source)."""
    try:
        h, w, n, source = _header(blob)
        start = _HEADER.size
        raw = _decompressor.decompress(blob[start + n :], max_output_size=4 * h * w)
        pixels = np.frombuffer(raw, np.uint8).reshape(4, h, w)
    except (ValueError, struct.error, zstandard.ZstdError) as err:
        raise BankFormatError(f"corrupt segment in {where}: {err}") from err
    return pixels, source


def read_meta(root: Path) -> dict:
    """Read and validate ``meta.json``; errors name the file and what is wrong."""
    meta_path = root / META_FILE
    if not root.exists():
        raise BankFormatError(f"{root}: no such folder (build a bank there first: sos-aug bank build --out {root} ...)")
    if not root.is_dir():
        raise BankFormatError(f"{root}: not a folder (a bank is a folder holding meta.json, index.npy and shards)")
    if not meta_path.is_file():
        hint = " (an interrupted build can be resumed by running it again)" if (root / ".partial").exists() else ""
        raise BankFormatError(f"{root}: a folder without meta.json, so no bank{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise BankFormatError(f"{meta_path}: not valid JSON: {err}") from err
    if meta.get("format") != FORMAT_NAME:
        raise BankFormatError(f"{meta_path}: not a {FORMAT_NAME} meta file")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise BankFormatError(f"{meta_path}: format version {meta['version']} is newer than this sos_aug")
    return meta


def check_files(root: Path, meta: dict) -> None:
    """Check that the index and every shard have the sizes meta.json recorded (catches truncation)."""
    index_path = root / meta["index"]
    expected = meta["num_segments"] * INDEX_DTYPE.itemsize
    if not index_path.is_file():
        raise BankFormatError(f"{index_path}: index file is missing")
    if index_path.stat().st_size != expected:
        raise BankFormatError(
            f"{index_path}: index has {index_path.stat().st_size} bytes, expected {expected} "
            f"for {meta['num_segments']} segments (truncated or overwritten)"
        )
    for shard in meta["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            raise BankFormatError(f"{path}: shard file is missing")
        if path.stat().st_size < shard["bytes"]:
            raise BankFormatError(f"{path}: shard is truncated ({path.stat().st_size} of {shard['bytes']} bytes)")
