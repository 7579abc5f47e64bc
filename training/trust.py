"""Reading checkpoints without running code: `torch.load(weights_only=True)` and exactly numpy's array globals.

A checkpoint is a pickle; unpickling a file handed over by someone else can run any code. `weights_only=True`
restricts unpickling to tensors and plain containers. Checkpoints written before this module kept numpy's RNG
state as an ndarray, which needs three more globals; they are allowed, and only they: `_reconstruct`,
`ndarray` and `dtype` (and the dtype classes of numpy >= 1.25) build arrays and do nothing else.
New checkpoints keep the numpy state as a tensor and plain values (see `numpy_state_to_plain`).
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy_array_globals() -> list:
    """The globals a pickled numpy array refers to, under the module names this numpy version uses."""
    allowed = [np.ndarray, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["_reconstruct"])
            allowed.append(module._reconstruct)
        except (ImportError, AttributeError):
            continue
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles the dtype class of an array, e.g. UInt32DType
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


def safe_load(path) -> object:
    """torch.load with weights_only=True and numpy's array-reconstruction globals allowed (old checkpoints)."""
    with torch.serialization.safe_globals(_numpy_array_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def numpy_state_to_plain(state: tuple) -> dict:
    """np.random.get_state() -> tensor and plain values, loadable with weights_only=True without allowlists."""
    name, keys, pos, has_gauss, cached = state
    return {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_state_from_plain(state) -> tuple:
    """The plain dict, or the older forms (a tuple with an ndarray from old float checkpoints, a list with a list of
    keys from old QAT ones) -> np.random.set_state's argument."""
    if isinstance(state, dict):
        keys = state["keys"].numpy().astype(np.uint32)
        return state["bit_generator"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]
    return tuple(state)
