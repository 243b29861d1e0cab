"""Where the project's data files live: inside the wheel, or in the source checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def project_dir(name: str) -> Path:
    """`migrations` or `channels`: packaged copy (wheel install) or the repository's."""
    packaged = Path(str(resources.files("selfserve"))) / "_data" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / name
