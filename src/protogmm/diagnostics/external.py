"""Read prototype matrices from checkpoints trained elsewhere (or by protogmm).

"Why Prototypes Collapse" (Arteaga et al., ICLR 2026) counts the unique prototypes of
published DINO-family models. Their prototypes are the rows of the last linear layer of the
projection head, usually weight-normalised (Salimans & Kingma, 2016):
``w_k = g_k * v_k / ||v_k||``. The diagnostics must read these *effective* rows, not the
raw ``weight_v`` (paper notes §4).

Supported layouts (the state dict is looked for at the root and under any nested mapping,
e.g. ``"student"``, ``"teacher"``, ``"model"``, ``"state_dict"``):

* facebookresearch/dino and iBOT: ``head.last_layer.weight_g`` ``[K, 1]`` and
  ``head.last_layer.weight_v`` ``[K, d]`` (iBOT's patch head: ``head.last_layer2.*``).
  With ``norm_last_layer=True`` the stored ``weight_g`` is all ones; a ``weight_v`` stored
  without ``weight_g`` is read with ``g = 1``.
* ``torch.nn.utils.parametrizations.weight_norm``:
  ``last_layer.parametrizations.weight.original0`` (``g``, ``[K, 1]``) and ``original1``
  (``v``, ``[K, d]``).
* DINOv2: ``dino_head.last_layer.*`` and ``ibot_head.last_layer.*`` in either form above,
  usually under ``"teacher"`` (or as ``teacher.dino_head...`` keys under ``"model"``).
* a plain ``last_layer.weight`` ``[K, d]`` (no weight norm), read as stored.
* protogmm's Lightning checkpoints: ``state_dict`` with ``gmm.mean`` (decoupled
  ``OnlineGMM``, prototypes ``mean / ||mean||``) or ``student.prototypes.weight`` /
  ``teacher.prototypes.weight`` (joint ``LearnedPrototypes``, prototypes
  ``weight / ||weight||``), and ``clustering.weight`` (partial, CAPI-style: the set the
  teacher scores against). SwAV's ``prototypes.weight`` is read the same way (SwAV
  normalises it after every step); solo-learn's SwAV stores it weight-normalised
  (``prototypes.weight_g`` / ``weight_v``), read as the rule above.

Files are always read with ``torch.load(weights_only=True)``, with one class added to its
allow-list: ``argparse.Namespace``, which facebookresearch/dino's full checkpoints use for
their arguments. A Namespace is rebuilt as an empty object whose attributes are set, and its
values go through the same restricted unpickler, so a Namespace of plain values is read and
one holding anything else is refused. Any other pickled object (a dataclass, a custom class)
is refused rather than unpickled, since unpickling can run arbitrary code; the error names
the refused class. To read such a file from a source you trust, allow-list its classes::

    with torch.serialization.safe_globals([MyConfig]):
        found = load_prototypes("checkpoint.pth")
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor

from protogmm.integrity import check_checkpoint_integrity

__all__ = [
    "check_checkpoint_path",
    "damaged_checkpoint_message",
    "describe_prototypes",
    "load_prototypes",
]

# Nested mappings whose names are dropped from a layer's name: they hold "the model".
_TRANSPARENT_CONTAINERS = frozenset({"state_dict", "model", "module", "state", "model_state"})
# Nested mappings that never hold model weights (optimizer moments are [K, d] too).
_SKIPPED_CONTAINERS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optimizer_states",
        "optimizer_state",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "scaler",
        "fp16_scaler",
        "loops",
        "callbacks",
    }
)
# Wrapper modules that add a path component without changing the model.
_WRAPPER_TOKENS = frozenset(
    {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
)
# Names a state-dict key may start with to say whose weights they are.
_ROLES = ("student", "teacher")
# Layer names (last dotted component) that hold prototypes, per reading rule.
_HEAD_LAYERS = frozenset({"last_layer", "last_layer2"})
_NORMALISED_LAYERS = frozenset({"prototypes", "clustering"})
_GMM_LAYERS = frozenset({"gmm"})
# Key suffix -> (rule, part).
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".parametrizations.weight.original0", "weight_norm", "g"),
    (".parametrizations.weight.original1", "weight_norm", "v"),
    (".weight_g", "weight_norm", "g"),
    (".weight_v", "weight_norm", "v"),
    (".weight", "plain", "w"),
    (".mean", "gmm", "w"),
)
_MAX_DEPTH = 4
_MAX_CANDIDATES = 20


def load_prototypes(path: str | Path, key: str | None = None) -> dict[str, Tensor]:
    """Read every prototype layer of a checkpoint as an effective ``[K, d]`` matrix.

    Each matrix holds the rows as the model uses them to score embeddings: ``g * v / ||v||``
    (row-wise) for a weight-normalised layer, the stored weight for a plain layer, and the
    L2-normalised rows for protogmm's prototype sets (see the module docstring for the
    layouts). Results are float32 CPU tensors, computed in float64.

    Rows with ``||v|| = 0`` become NaN, and NaN rows in the file are returned as they are:
    this function only reads, and the diagnostics (e.g.
    :func:`protogmm.diagnostics.unique_prototypes`) raise on non-finite rows.

    Names are ``"<role>/<layer>"``: the role is the nested mapping the weights were found
    in (``"student"``, ``"teacher"``, ...) or the first component of the key, and the layer
    is the key without wrapper components (``module.``, ``_orig_mod.``, FSDP wrappers) and
    without the parameter suffix, e.g. ``"student/head.last_layer"``,
    ``"teacher/dino_head.last_layer"``, ``"teacher/prototypes"``, ``"gmm"``. Containers
    such as ``"state_dict"`` or ``"model"`` do not appear in names unless two layers would
    otherwise get the same name.

    Args:
        path: the checkpoint file (anything ``torch.save`` wrote).
        key: if given, return only the layer with this name.

    Returns:
        ``{name: [K, d] float32 tensor}`` in the order the layers appear in the file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        IsADirectoryError: if ``path`` is a directory.
        ValueError: if the file holds non-tensor objects (it is not unpickled), cannot be
            read by ``torch.load`` (a truncated file says so), holds no prototype layer (the
            message lists up to 20 of its 2-D tensors), holds a layer with inconsistent
            ``g``/``v`` shapes, or has no layer named ``key`` (the message lists the names).
    """
    path = Path(path)
    check_checkpoint_path(path)
    checkpoint = _load_tensors_only(path)
    found = _find_layers(checkpoint, path)
    if not found:
        candidates = [
            f"{'/'.join((*prefix, name))} {list(t.shape)}"
            for prefix, mapping in _tensor_mappings(checkpoint)
            for name, t in mapping.items()
            if t.ndim == 2
        ]
        shown = ", ".join(candidates[:_MAX_CANDIDATES]) or "none"
        more = f" (and {len(candidates) - _MAX_CANDIDATES} more)"
        more = more if len(candidates) > _MAX_CANDIDATES else ""
        raise ValueError(
            f"no prototype layer (last_layer weight_g/weight_v, parametrizations, plain "
            f"last_layer.weight, prototypes.weight or gmm.mean) found in {path}; "
            f"2-D tensors seen: {shown}{more}"
        )
    if key is not None:
        if key not in found:
            raise ValueError(f"key {key!r} not found in {path}; prototype layers: {list(found)}")
        return {key: found[key]}
    return found


def describe_prototypes(found: Mapping[str, Tensor]) -> str:
    """List prototype matrices, one line each: name, ``K`` and ``d``.

    Args:
        found: ``{name: [K, d] tensor}``, e.g. the result of :func:`load_prototypes`.

    Returns:
        Lines ``"<name>: K=<K>, d=<d>"``, with ``", <n> non-finite rows"`` appended where a
        matrix has NaN or Inf rows; ``"no prototype layers"`` for an empty mapping.

    Raises:
        ValueError: if a value is not a 2-D tensor.
    """
    if not found:
        return "no prototype layers"
    lines = []
    for name, matrix in found.items():
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"found[{name!r}] must be a 2-D tensor [K, d], got {shape}")
        line = f"{name}: K={matrix.shape[0]}, d={matrix.shape[1]}"
        bad = int((~torch.isfinite(matrix).all(dim=1)).sum()) if matrix.is_floating_point() else 0
        if bad:
            line += f", {bad} non-finite rows"
        lines.append(line)
    return "\n".join(lines)


#: The first bytes of a zip archive (a local file header): how every ``torch.save`` file starts.
_ZIP_MAGIC = b"PK\x03\x04"


def check_checkpoint_path(path: str | os.PathLike[str]) -> None:
    """Raise a one-line error unless ``path`` is a file: absent, or a directory.

    Every checkpoint reader (``diagnose`` here; ``fit``, ``eval`` and ``export`` through
    :func:`protogmm.training.atomic_io.read_checkpoint`) says it in the same words.

    Raises:
        IsADirectoryError: ``path`` is a directory (e.g. a run folder given for its checkpoint).
        FileNotFoundError: nothing is at ``path``.
    """
    if Path(path).is_dir():
        raise IsADirectoryError(f"checkpoint path is a directory, not a file: {path}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")


def damaged_checkpoint_message(path: str | os.PathLike[str]) -> str | None:
    """One line naming ``path`` if torch cannot read it because it is truncated, else None.

    Called after ``torch.load`` failed. A file that starts as a zip archive (what
    ``torch.save`` writes) but whose central directory, at the archive's end, is missing
    was cut short (an interrupted copy, download or save) or damaged; an empty file too.
    Torch's own message for these is a paragraph about its zip reader ("failed finding
    central directory ... internal miniz error"). Other failures (a foreign format, a
    refused class) are left to the caller's message.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_ZIP_MAGIC))
        if not head:
            reason = "an empty file"
        elif head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
            reason = "not a zip archive torch can read: its end is missing"
        else:
            return None
    except OSError:
        return None
    return f"{path}: cannot be read: truncated or corrupt checkpoint ({reason})"


def _load_tensors_only(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``, turning a refusal into a one-line error.

    The archive's CRC-32s are checked first (:mod:`protogmm.integrity`): torch does not.
    A ``.safetensors`` file (``protogmm export``'s prototypes, or another project's) holds
    tensors only and is read with safetensors."""
    if Path(path).suffix == ".safetensors":
        return _load_safetensors(path)
    check_checkpoint_integrity(path)
    try:
        # argparse.Namespace: DINO's full checkpoints hold their arguments in one (see above).
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on a corrupt or foreign file
        damaged = damaged_checkpoint_message(path)
        if damaged is not None:  # not torch's paragraph about miniz: what is wrong, in one line
            raise ValueError(damaged) from None
        if isinstance(error, pickle.UnpicklingError):
            _raise_refused(path, error)
        reason = f"{type(error).__name__}: {_last_line(str(error))}"
        raise ValueError(f"{path} is not a readable torch checkpoint ({reason})") from None


def _raise_refused(path: Path, error: pickle.UnpicklingError) -> NoReturn:
    """One line for what ``torch.load(weights_only=True)`` refused: the class, if it names one."""
    match = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(error))
    if match:
        raise ValueError(
            f"{path} holds non-tensor objects ({match.group(1)}) and will not be unpickled "
            f"(torch.load weights_only=True); if you trust the file, allow-list them with "
            f"torch.serialization.safe_globals"
        ) from None
    raise ValueError(
        f"{path} could not be read with torch.load(weights_only=True) and will not be "
        f"unpickled otherwise: {_last_line(str(error))}"
    ) from None


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors, or one line naming the file."""
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 (a corrupt header or data: one line)
        reason = f"{type(error).__name__}: {_last_line(str(error))}"
        raise ValueError(f"{path} is not a readable safetensors file ({reason})") from None


def _last_line(message: str) -> str:
    """The last non-empty line of an error message (torch's are multi-line)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "no details"


def _tensor_mappings(
    obj: object, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], dict[str, Tensor]]]:
    """Yield ``(nesting path, {key: tensor})`` for every mapping holding tensors directly."""
    if not isinstance(obj, Mapping) or len(prefix) > _MAX_DEPTH:
        return
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if tensors:
        yield prefix, tensors
    for k, value in obj.items():
        if isinstance(value, Mapping) and str(k) not in _SKIPPED_CONTAINERS:
            yield from _tensor_mappings(value, (*prefix, str(k)))


def _find_layers(checkpoint: object, path: Path) -> dict[str, Tensor]:
    """Collect the effective prototype matrices of every state dict in ``checkpoint``."""
    found: dict[str, Tensor] = {}
    for prefix, mapping in _tensor_mappings(checkpoint):
        for base, rule, parts in _group_layers(mapping):
            matrix = _effective_matrix(rule, parts, base, prefix, path)
            if matrix is None:
                continue
            short, long = _layer_names(prefix, base)
            name = short if short not in found else long
            index = 2
            while name in found:
                name, index = f"{long}#{index}", index + 1
            found[name] = matrix
    return found


def _group_layers(mapping: dict[str, Tensor]) -> list[tuple[str, str, dict[str, Tensor]]]:
    """Group state-dict entries into prototype layers: ``(key base, rule, {part: tensor})``."""
    layers: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, tensor in mapping.items():
        if not tensor.is_floating_point():
            continue
        for suffix, rule, part in _SUFFIXES:
            if not key.endswith(suffix):
                continue
            base = key[: -len(suffix)]
            layer = _strip_wrappers(base).rsplit(".", 1)[-1]
            wanted = {
                "weight_norm": _HEAD_LAYERS | _NORMALISED_LAYERS,
                "plain": _HEAD_LAYERS | _NORMALISED_LAYERS,
                "gmm": _GMM_LAYERS,
            }[rule]
            if layer in wanted:
                layers.setdefault((base, rule), {})[part] = tensor
            break
    return [(base, rule, parts) for (base, rule), parts in layers.items()]


def _effective_matrix(
    rule: str, parts: dict[str, Tensor], base: str, prefix: tuple[str, ...], path: Path
) -> Tensor | None:
    """The ``[K, d]`` rows as the model uses them, or None if ``parts`` is not a layer."""
    where = f"{'/'.join((*prefix, base))} in {path}"
    if rule == "weight_norm":
        if "v" not in parts:
            return None  # a lone gain vector is not a layer
        v = parts["v"].to(torch.float64)
        if v.ndim != 2:
            raise ValueError(f"weight_v of {where} must be [K, d], got shape {tuple(v.shape)}")
        g = parts.get("g")
        g = torch.ones(v.shape[0], 1, dtype=torch.float64) if g is None else g.to(torch.float64)
        if g.numel() != v.shape[0]:
            raise ValueError(
                f"weight_g of {where} must have one entry per row of weight_v "
                f"{tuple(v.shape)}, got shape {tuple(g.shape)}"
            )
        # Weight norm with dim=0: w_k = g_k v_k / ||v_k|| (Salimans & Kingma, 2016).
        matrix = g.reshape(-1, 1) * v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    else:
        w = parts["w"].to(torch.float64)
        if w.ndim != 2:
            return None  # e.g. a 1-D "mean" buffer that is not a mixture
        layer = _strip_wrappers(base).rsplit(".", 1)[-1]
        normalise = rule == "gmm" or layer in _NORMALISED_LAYERS
        matrix = F.normalize(w, dim=1) if normalise else w
    return matrix.to(torch.float32)


def _strip_wrappers(key: str) -> str:
    """Drop wrapper components (``module``, ``_orig_mod``, FSDP wrappers) from a dotted key."""
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in ("module", "model"):
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_TOKENS)


def _layer_names(prefix: tuple[str, ...], base: str) -> tuple[str, str]:
    """Short name (roles and layer) and long name (full nesting path and layer) of a layer."""
    layer = _strip_wrappers(base)
    roles = [p for p in prefix if p not in _TRANSPARENT_CONTAINERS]
    first, _, rest = layer.partition(".")
    if first in _ROLES and rest:
        roles.append(first)
        layer = _strip_wrappers(rest)
    short = "/".join((*roles, layer))
    long = "/".join((*prefix, _strip_wrappers(base)))
    return short, long
