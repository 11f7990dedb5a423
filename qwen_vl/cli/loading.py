"""Opening a checkpoint folder for the command, with clear errors and a progress line."""

from __future__ import annotations

from pathlib import Path

import torch

from ..bundled import bundled_model_dir, has_weights
from .errors import CliError
from .options import ModelOptions
from .progress import status


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or CliError when it is unknown or absent."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CliError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CliError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return dev


def check_model_dir(model_dir: str | Path) -> Path:
    """The checkpoint folder (``demo``: the bundled demo model), or CliError naming what is missing."""
    bundled = bundled_model_dir(model_dir)
    if bundled is not None:
        if not has_weights(bundled):
            raise CliError(
                f"the bundled {model_dir!r} model has no weights in this installation ({bundled}); "
                "make them with recipes/demo_model/train.sh or pass --model DIR"
            )
        return bundled
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise CliError(f"{model_dir}: not a checkpoint directory (no such folder)")
    if not (path / "config.json").is_file():
        raise CliError(f"{model_dir}: not a checkpoint directory (no config.json)")
    return path


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of ``model_dir``."""
    from ..tokenizer import QWenTokenizer

    path = check_model_dir(model_dir)
    try:
        return QWenTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CliError(f"{model_dir}: cannot load the tokenizer ({e})") from None


def load_model(options: ModelOptions):
    """The model of ``options.model_dir`` in the requested dtype on the requested device."""
    from ..modeling import QWenLMHeadModel

    path = check_model_dir(options.model_dir)
    check_device(options.device)
    dtype = options.resolved_dtype()
    with status(f"loading {path.name} ({dtype}, {options.device})", quiet=options.quiet):
        try:
            return QWenLMHeadModel.from_pretrained(path, dtype=dtype, device=options.device)
        except (OSError, ValueError) as e:
            raise CliError(f"{options.model_dir}: cannot load the model ({e})") from None
