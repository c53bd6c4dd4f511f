"""The images the components run in, tagged with the package version.

    <registry>/ple-adatt-cpu:<version>    validate, report, register (and CPU training)
    <registry>/ple-adatt-cuda:<version>   train-phase1, train-phase2 on a GPU node

The registry comes from ``$PLE_ADATT_REGISTRY`` (``make images REGISTRY=...`` and
``make compile REGISTRY=...`` set it) and defaults to :data:`DEFAULT_REGISTRY`. The
committed component YAMLs always name the default registry; the compiled pipeline names
the registry it was compiled for (``pipelines.pipeline.build_pipeline(registry=...)``).
"""

from __future__ import annotations

import os
import re

from ple_adatt import __version__ as VERSION

DEFAULT_REGISTRY = "ghcr.io/ple-adatt"
REGISTRY_ENV = "PLE_ADATT_REGISTRY"
#: image flavour -> repository name under the registry
FLAVOURS: dict[str, str] = {"cpu": "ple-adatt-cpu", "cuda": "ple-adatt-cuda"}

_REGISTRY_RE = re.compile(r"^[a-z0-9]([a-z0-9._:-]*[a-z0-9])?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*$")


def registry(value: str | None = None) -> str:
    """The registry to tag images with: ``value``, else ``$PLE_ADATT_REGISTRY``, else the default."""
    reg = (value or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).rstrip("/")
    if not _REGISTRY_RE.match(reg):
        raise ValueError(
            f"image registry {reg!r} is not a valid registry/namespace (lower case, e.g. "
            f"ghcr.io/my-org or localhost:5000); set {REGISTRY_ENV} or REGISTRY=..."
        )
    return reg


def image(flavour: str, registry_: str | None = None) -> str:
    """``<registry>/ple-adatt-<flavour>:<version>``; ValueError for an unknown flavour."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown image flavour {flavour!r}; valid: {', '.join(FLAVOURS)}")
    return f"{registry(registry_)}/{FLAVOURS[flavour]}:{VERSION}"


#: the images the committed component YAMLs name (default registry); the training
#: components name the CUDA image, the others the CPU image
DEFAULT_IMAGE = f"{DEFAULT_REGISTRY}/{FLAVOURS['cpu']}:{VERSION}"
DEFAULT_CUDA_IMAGE = f"{DEFAULT_REGISTRY}/{FLAVOURS['cuda']}:{VERSION}"
