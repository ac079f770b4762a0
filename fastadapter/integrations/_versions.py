"""The versions of ``transformers`` and ``peft`` the integrations are written against and tested with.

Both libraries change their attention internals between minor releases (the attention interface, cache and mask
objects in transformers; the ``AdaptedAttention`` wrapper in peft), so the integrations refuse other minor
versions with a message naming the installed and the supported ones, rather than computing something subtly
different. The pins match the ``test`` extra of setup.py.
"""
from __future__ import annotations

import importlib

#: package -> the supported ``major.minor`` releases (any patch release of them).
SUPPORTED_VERSIONS = {"transformers": ("5.23",), "peft": ("0.21",)}


class UnsupportedVersionError(RuntimeError):
    """The installed transformers or peft is not a version the integration supports."""


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def require_supported_version(package: str):
    """Import ``package`` and return it, or raise :class:`UnsupportedVersionError` naming the installed version
    and the supported ones (``ImportError`` when it is not installed)."""
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"fastadapter.integrations needs {package} (supported: "
                          f"{', '.join(v + '.x' for v in SUPPORTED_VERSIONS[package])}); install fastadapter's "
                          f"'test' extra or `pip install {package}=={SUPPORTED_VERSIONS[package][-1]}.*`") from exc
    installed = getattr(module, "__version__", "unknown")
    if _major_minor(installed) not in SUPPORTED_VERSIONS[package]:
        raise UnsupportedVersionError(
            f"{package} {installed} is not supported by fastadapter.integrations; supported versions: "
            f"{', '.join(v + '.x' for v in SUPPORTED_VERSIONS[package])} (its attention internals differ between "
            f"minor releases)")
    return module
