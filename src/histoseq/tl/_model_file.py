"""The file format of histoseq's models: JSON text and tensors, never Python objects.

:class:`~histoseq.tl.ExpressionModel` writes the format :data:`FORMAT` with the fields :data:`META_FIELDS`;
another model (:class:`~histoseq.tl.ClassifierModel`) writes the same container under its own format name
and fields (``write_model(..., format=...)``, ``read_model(..., format=..., fields=...)``).

A model file is ``torch.save({"meta": <JSON text>, "tensors": {name: tensor}})``. It is read back with
``torch.load(path, weights_only=True)``, which refuses any pickled object, so loading a model never runs
code. :func:`read_model` checks the format, its version and the metadata's fields before anything else
looks at them.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "histoseq.ExpressionModel"
#: Version of the format that this histoseq writes; files of a newer version are refused.
FORMAT_VERSION = 1
#: Fields of the metadata, with the JSON types they must have.
META_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,),
    "genes": (list,),
    "target_transform": (str, type(None)),
    "embedding": (str, type(None)),
    "embedding_params": (dict,),
    "n_features": (int,),
    "config": (dict,),
    "provenance": (dict,),
}


def write_model(
    path: str | Path, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, format: str = FORMAT
) -> Path:
    """Write ``meta`` (JSON-able) and ``arrays`` to ``path`` as a file of ``format``; an existing file is replaced."""
    import torch

    from .. import __version__

    path = Path(path)
    record = {"format": format, "format_version": FORMAT_VERSION, "histoseq_version": __version__, **meta}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    torch.save({"meta": json.dumps(record), "tensors": tensors}, path)
    return path


def read_model(
    path: str | Path, *, format: str = FORMAT, fields: Mapping[str, tuple[type, ...]] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata and arrays of a model file written by :func:`write_model`, checked; nothing is unpickled.

    ``format`` is the format name the file must have and ``fields`` the metadata fields it must hold, with
    their JSON types (by default those of an :class:`~histoseq.tl.ExpressionModel`, :data:`META_FIELDS`).
    """
    import torch

    path = Path(path)
    where = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {where}.")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is no model of histoseq's
        raise ValueError(
            f"{where} is not a histoseq model file: it is not a file written by `torch.save` (empty, cut short, "
            "or another kind of file). Give the path of a file written by the model's `save` method."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{where} is not a histoseq model file: it holds Python objects other than tensors and plain "
            "data, and histoseq refuses to unpickle them (that could run code). Save models with "
            "`ExpressionModel.save`."
        ) from err
    except Exception as err:  # torch raises many kinds of errors on files it cannot parse
        raise ValueError(f"{where} is not a histoseq model file (torch could not read it: {err}).") from err
    if not (isinstance(obj, dict) and set(obj) == {"meta", "tensors"} and isinstance(obj["meta"], str)):
        raise ValueError(f"{where} is not a histoseq model file (expected the keys 'meta' and 'tensors').")
    try:
        meta = json.loads(obj["meta"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: the model metadata is not valid JSON.") from err
    if not isinstance(meta, dict) or meta.get("format") != format:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{where} is not a histoseq model file of format {format!r} (format {found!r}).")
    version = meta.get("format_version", 0)
    if not isinstance(version, int):
        raise ValueError(f"{where}: the model metadata has a malformed `format_version` ({version!r}).")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where} was written by a newer histoseq ({meta.get('histoseq_version')}, format version "
            f"{version}); upgrade histoseq to read it."
        )
    fields = META_FIELDS if fields is None else fields
    bad = [
        k
        for k, types in fields.items()
        if not isinstance(meta.get(k, ...), types) or (isinstance(meta.get(k), bool) and bool not in types)
    ]
    if bad:
        raise ValueError(
            f"{where}: the model metadata lacks or has malformed fields {bad}; the file is damaged or was not "
            f"written by the `save` method of the model ({format})."
        )
    tensors = obj["tensors"]
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{where}: 'tensors' must map names to tensors.")
    return meta, {k: v.numpy().copy() for k, v in tensors.items()}
