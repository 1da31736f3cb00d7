"""A client's arrays made to fit a model's declared input datatype, or a message that says
exactly what to do: a float64 ``.npy`` (what ``np.random.rand`` gives) for an FP32 input, an
int32 array for INT64 token ids. Shared by ``lastmile infer`` and the TUI's playground.

The rule: a conversion happens only when nothing the model would see changes beyond the
precision of its own datatype: integers that fit the target's range, floats that stay finite
(narrowing a float rounds to the model's precision, which is what the model computes in
anyway), integers to a float type that holds them exactly. Anything else (floats to
integers, values out of range, bool from numbers) is refused with the dtypes named and the
one line of numpy that converts it, so the operator decides.
"""

from __future__ import annotations

import numpy as np

from lastmile.models.spec import V2_TO_NUMPY



class InputTypeError(ValueError):
    """The array cannot be converted without changing values; the message says how to fix it."""


def _how(name: str, target: np.dtype) -> str:
    return f"convert it yourself if that is what you mean: np.save(FILE, x.astype(np.{target.name})) and pass that file as --input {name}=FILE"


def conform(name: str, array: np.ndarray, datatype: str) -> tuple[np.ndarray, str | None]:
    """``array`` as the numpy dtype of V2 ``datatype``, and a note when it was converted."""
    target = V2_TO_NUMPY.get(datatype) if datatype != "BF16" else None
    if target is None:  # BF16, BYTES: no numpy equivalent to check against; the daemon judges
        return array, None
    source = array.dtype
    if source == target:
        return array, None
    wants = f"input {name!r}: the file holds {source.name}, the model's input is {datatype} (numpy {target.name})"
    if source.kind not in "biuf":
        raise InputTypeError(f"{wants}; {source.name} data cannot be sent as {datatype}")
    if np.can_cast(source, target, casting="safe"):
        return array.astype(target), f"{wants}: converted (no value changes)"
    if target.kind == "b":
        raise InputTypeError(f"{wants}; refusing to turn numbers into booleans: {_how(name, target)}")
    if source.kind == "f" and target.kind in "iu":
        raise InputTypeError(f"{wants}; floats are not converted to integers (it would truncate them): {_how(name, target)}")
    if target.kind in "iu":  # narrower or differently signed integers (or bool): check the range
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputTypeError(f"{wants}; values from {array.min()} to {array.max()} do not fit {target.name} "
                                 f"({info.min} to {info.max})")
        return array.astype(target), f"{wants}: converted (every value fits {target.name})"
    # to a float type: narrowing floats, or integers too large for it to hold exactly
    converted = array.astype(target)
    if source.kind == "f":
        if not np.all(np.isfinite(converted) | ~np.isfinite(array)):
            raise InputTypeError(f"{wants}; some values overflow {target.name} (largest magnitude {np.abs(array).max():g})")
        return converted, f"{wants}: converted (rounded to {target.name} precision, what the model computes in)"
    if not np.array_equal(converted.astype(source), array):
        raise InputTypeError(f"{wants}; some integers are too large to be exact in {target.name}: {_how(name, target)}")
    return converted, f"{wants}: converted (every integer is exact in {target.name})"
