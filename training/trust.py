"""Reading checkpoints without running code: `torch.load(weights_only=True)` and exactly numpy's array globals.

A checkpoint is a pickle; unpickling a file handed over by someone else can run any code. `weights_only=True`
restricts unpickling to tensors and plain containers. Checkpoints written before this module kept numpy's RNG
state as an ndarray, which needs three more globals; they are allowed, and only they: `_reconstruct`,
`ndarray` and `dtype` (and the dtype classes of numpy >= 1.25) build arrays and do nothing else.
New checkpoints keep the numpy state as a tensor and plain values (see `numpy_state_to_plain`).
"""

from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import torch

from device_runtime.core.errors import InputError


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


def safe_load(path, what: str = "checkpoint") -> object:
    """torch.load with weights_only=True and numpy's array-reconstruction globals allowed (old checkpoints).

    Every checkpoint and weights file the project reads comes through here.

    Raises:
        InputError: one line naming the file: it holds objects that could run code (refused, never loaded),
            or it cannot be read as a `what` (not a torch file, cut short).
    """
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr; the error says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only refuses; torch's text advises weights_only=False
        raise InputError(f"{path}: refused: the file holds pickled objects that could run code when loaded "
                         f"({_refused_part(str(err))}); nerveseg reads only tensors and plain values from a "
                         f"{what}") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except Exception as err:  # not a torch file at all, a zip cut short, ...
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
        raise InputError(f"{path}: cannot read {what} (not a PyTorch file, or cut short: "
                         f"{type(err).__name__}: {first})") from None


def _refused_part(message: str) -> str:
    """What the weights-only unpickler refused ("posix.system", "Unsupported operand 149"), from its long text."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return found.group(1)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))),
                "refused by weights-only loading")


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
