"""Loading encoder checkpoints an operator configured, safely.

safetensors files are read directly. ``.pt`` / ``.pth`` / ``.bin`` files (open_clip's and
PyTorch's own formats) are read only through ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers, so a checkpoint cannot run code; any other file is
refused. The state dict is then matched against the architecture key by key and shape by
shape, and a mismatch is an error that names the file, the config and the first differences,
instead of a model that silently keeps random weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SHOW = 5  # differences listed in an error message


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (see the module docstring for what is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(
                f"encoder checkpoint {path}: not a readable safetensors file ({exc})"
            ) from exc
    if suffix in TORCH_SUFFIXES:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refusals are UnpicklingError; zip errors vary
            raise ValueError(
                f"encoder checkpoint {path}: not loadable with torch.load(weights_only=True) "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return _unwrap(loaded, path)
    raise ValueError(
        f"encoder checkpoint {path}: unsupported format {suffix or '(no suffix)'!r}; use "
        f"safetensors ({', '.join(SAFETENSORS_SUFFIXES)}) or a PyTorch state dict "
        f"({', '.join(TORCH_SUFFIXES)}, loaded with weights_only=True)"
    )


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a torch checkpoint: open_clip's training checkpoints wrap it as
    ``{"state_dict": …, "epoch": …}``, and DDP prefixes every key with ``module.``."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"encoder checkpoint {path}: holds a {type(loaded).__name__}, not a state dict"
        )
    state = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"encoder checkpoint {path}: entry {key!r} is not a tensor")
        state[key.removeprefix("module.")] = value
    return state


def match_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, config: str
) -> None:
    """Raise ValueError unless ``state`` has exactly the model's keys with the same shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({', '.join(missing[:_SHOW])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:_SHOW])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) ({'; '.join(wrong[:_SHOW])})")
    if problems:
        raise ValueError(
            f"encoder checkpoint {path} does not fit config {config!r}: " + "; ".join(problems)
        )


def save_state_dict(
    model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None
) -> str:
    """Write the model's weights as safetensors (atomically); returns the file's SHA-256."""
    from safetensors.torch import save_file

    from warehouse.files import atomic_local_path

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_local_path(str(path)) as tmp:
        save_file(state, tmp, metadata=metadata)
    return file_sha256(Path(path))
