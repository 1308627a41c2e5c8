"""Let mmdetection's data pipeline import under ``mmcv-lite`` (the ``sos-aug[mmdet]`` extra).

mmdet's mask structures import ``mmcv.ops`` at load time, which loads the compiled ``mmcv._ext``;
``mmcv-lite`` has none, so ``import mmdet.datasets`` fails although the data pipeline never calls a
compiled op. :func:`allow_mmcv_lite` stands in a module whose every op raises, when called, an error
that says what to install; with a full ``mmcv`` it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import types

FULL_MMCV = "a full mmcv build with compiled ops (pip install -U openmim && mim install mmcv)"


class MissingMMCVOp(RuntimeError):
    """A compiled mmcv op was called under mmcv-lite."""


def allow_mmcv_lite() -> bool:
    """Make ``mmcv._ext`` importable where mmcv's compiled ops are missing; returns whether it had to."""
    if "mmcv._ext" in sys.modules:
        return isinstance(sys.modules["mmcv._ext"], _StandIn)
    try:
        if importlib.util.find_spec("mmcv._ext") is not None:
            return False
    except ModuleNotFoundError:  # no mmcv at all: mmdet's own import error will say so
        return False
    sys.modules["mmcv._ext"] = _StandIn("mmcv._ext")
    return True


class _StandIn(types.ModuleType):
    """``mmcv._ext`` under mmcv-lite: every name is an op that raises :class:`MissingMMCVOp`."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise MissingMMCVOp(f"mmcv op {name!r} is compiled code that mmcv-lite does not have; "
                                f"sos_aug's pipeline transforms need none, but this model does: install {FULL_MMCV}")

        missing.__name__ = name
        return missing
