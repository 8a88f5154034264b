"""Reading ``torch.save`` files safely, with one-line errors that say what the file is instead."""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from typing import Any, Sequence

import torch

from fixedpoint.errors import InputError, first_line

#: First byte of a pickle of protocol 2 or later: torch.save's legacy (pre-zip) format starts so.
_PICKLE_PROTOCOL_OPCODE = 0x80


def load_torch_file(path: str | os.PathLike, role: str, what: str, allowed_classes: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, as an :class:`InputError` when it fails.

    ``role`` names the file ("weights"), ``what`` its expected content ("an RNN/GRU/LSTM module
    or state_dict"), both for messages.  Only
    tensors, containers and ``allowed_classes`` are unpickled: a file that refers to any other
    Python object (which could run code on loading) is refused, in one line that names the object.
    Warnings torch emits while loading are not shown: the outcome is the value or the error.
    """
    if not os.path.isfile(path):
        raise InputError(f"{role} file not found: {path}")
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch ≥ 2.5
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if safe_globals is None or not allowed_classes:
                return torch.load(path, map_location="cpu", weights_only=True)
            with safe_globals(list(allowed_classes)):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable files
        raise InputError(_describe_failure(path, what, error)) from error


def _describe_failure(path: str | os.PathLike, what: str, error: Exception) -> str:
    if not _looks_like_torch_save(path):  # text read as a legacy pickle fails in the unpickler too
        return f"cannot read {path}: it is not a torch.save file; expected {what}"
    text = str(error)
    if "Weights only load failed" in text or "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y"
        names = f" ({found.group(1)})" if found else ""
        return (
            f"cannot read {path}: it refers to Python objects other than tensors{names}, which could run "
            f"code when loaded, so it is refused; expected {what}"
        )
    return f"cannot read {path} as a torch.save file of {what}: {type(error).__name__}: {first_line(error)}"


def _looks_like_torch_save(path: str | os.PathLike) -> bool:
    """Whether the file starts as torch.save writes: a zip archive, or (legacy) a binary pickle."""
    try:
        if zipfile.is_zipfile(path):
            return True
        with open(path, "rb") as file:
            return file.read(1) == bytes([_PICKLE_PROTOCOL_OPCODE])
    except OSError:
        return False
