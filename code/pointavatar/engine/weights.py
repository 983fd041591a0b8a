"""Pretrained weight files (VGG16 for the perceptual loss, AlexNet and the LPIPS head for the metric).

Nothing is downloaded at run time: the files are looked up in the torch hub checkpoint folders, where
`download_data.bash` puts them, and a missing file is reported with every place searched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import PointAvatarError


def weight_search_dirs() -> list[Path]:
    """Folders searched for pretrained weight files, in order, without duplicates.

    `torch.hub.get_dir()/checkpoints` is where torchvision itself caches weights (it already honours
    `$TORCH_HOME` and `torch.hub.set_dir`); `$TORCH_HOME/hub/checkpoints` and `$TORCH_HOME/checkpoints`
    are also searched so that a file placed by hand next to an unusual hub setting is still found.
    """
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        dirs += [Path(torch_home) / "hub" / "checkpoints", Path(torch_home) / "checkpoints"]
    unique: list[Path] = []
    for d in dirs:
        d = d.expanduser()
        if d not in unique:
            unique.append(d)
    return unique


def locate_weight_file(name: str, extra_candidates: Iterable[Path] = ()) -> tuple[Path | None, list[Path]]:
    """Look for a weight file called `name`.

    Returns (the first existing path or None, every path that was checked, in order). `extra_candidates`
    are full file paths checked after the hub folders.
    """
    checked = [d / name for d in weight_search_dirs()] + [Path(p) for p in extra_candidates]
    for path in checked:
        if path.is_file():
            return path, checked
    return None, checked


def find_weight_file(name: str, url: str | None = None, disable_hint: str | None = None) -> Path:
    """Return the path of the pretrained weight file `name`, or raise PointAvatarError.

    The error names the file, every place we looked, how to get it (download_data.bash, or `url` saved
    into the hub checkpoint folder) and, when given, the conf setting that runs without it.
    """
    path, checked = locate_weight_file(name)
    if path is not None:
        return path
    looked = "\n".join(f"  - {p}" for p in checked)
    how = "run `bash download_data.bash` from the repository root"
    if url:
        how += f", or download {url} and place it in {checked[0].parent}"
    msg = f"Pretrained weight file '{name}' not found. Looked in:\n{looked}\nTo get it: {how}."
    if disable_hint:
        msg += f" Alternatively, {disable_hint}."
    raise PointAvatarError(msg)
