"""The versions of ``transformers`` and ``peft`` the integrations support, and what happens with the others.

Both libraries change their attention internals between minor releases (the attention interface, cache and mask
objects in transformers; the ``AdaptedAttention`` wrapper in peft). The integrations support a range of minor
releases whose internals they were checked against, and CI tests both ends of it (``.ci/integration-versions.sh``
runs tests/integrations/test_integrations_*.py with the oldest; the ``test`` extra installs the newest):

* a version inside :data:`SUPPORTED_RANGES` is used silently;
* an older one is refused with :class:`UnsupportedVersionError` (its internals are known to differ);
* a newer one, not yet tested, is used with one :class:`UntestedVersionWarning`;
* a package that is not installed, or that is installed but fails to import, raises ``ImportError`` saying
  which of the two it is (the import's own error is chained).
"""
from __future__ import annotations

import importlib
import re
import warnings

#: package -> (oldest, newest) supported ``major.minor`` releases, both tested (any patch release of them).
SUPPORTED_RANGES = {"transformers": ("5.17", "5.23"), "peft": ("0.18", "0.21")}
#: The ``pip install`` line of the newest tested release of each package.
_PIP_HINT = {package: f"pip install '{package}=={newest}.*'" for package, (_, newest) in SUPPORTED_RANGES.items()}

_warned: set[tuple[str, str]] = set()


class UnsupportedVersionError(RuntimeError):
    """The installed transformers or peft is older than the versions the integrations support."""


class UntestedVersionWarning(UserWarning):
    """The installed transformers or peft is newer than the newest version the integrations were tested with."""


def _major_minor(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"5.23.0"``, ``"5.24.0.dev0"`` or ``"0.21.2rc1"``."""
    match = re.match(r"\s*v?(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read the version {version!r}")
    return int(match.group(1)), int(match.group(2))


def supported_range(package: str) -> str:
    """``"5.17.x to 5.23.x"``: the supported releases of ``package`` in words."""
    oldest, newest = SUPPORTED_RANGES[package]
    return f"{oldest}.x to {newest}.x"


def check_version(package: str, installed: str) -> None:
    """Raise :class:`UnsupportedVersionError` for a version older than the supported range, warn once (per
    package and version) with :class:`UntestedVersionWarning` for a newer one, and accept the range."""
    oldest, newest = (_major_minor(v) for v in SUPPORTED_RANGES[package])
    try:
        version = _major_minor(installed)
    except ValueError:
        raise UnsupportedVersionError(f"{package} reports the version {installed!r}, which fastadapter.integrations "
                                      f"cannot read; supported: {supported_range(package)}") from None
    if version < oldest:
        raise UnsupportedVersionError(
            f"{package} {installed} is older than fastadapter.integrations supports ({supported_range(package)}: "
            f"its attention internals differ); upgrade it: {_PIP_HINT[package]}")
    if version > newest and (package, installed) not in _warned:
        _warned.add((package, installed))
        warnings.warn(f"{package} {installed} is newer than the versions fastadapter.integrations was tested with "
                      f"({supported_range(package)}); it is used, but check the results (tests/"
                      f"test_integrations_*.py) or install a tested one: {_PIP_HINT[package]}",
                      UntestedVersionWarning, stacklevel=3)


def require_supported_version(package: str):
    """Import ``package`` and return it after :func:`check_version`.

    Raises:
        ImportError: ``package`` is not installed (with the ``pip install`` line), or it is installed but its
            import failed: then the message gives that error, which is the real cause (a broken install, a
            missing dependency of it, a module shadowing one it imports), and the import's exception is chained.
        UnsupportedVersionError: an installed version older than :data:`SUPPORTED_RANGES`.
    """
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and missing == package:
            raise ImportError(f"fastadapter.integrations needs {package} ({supported_range(package)}), which is not "
                              f"installed: {_PIP_HINT[package]} (or install fastadapter's 'bench' or 'test' "
                              f"extra)") from exc
        raise ImportError(f"fastadapter.integrations needs {package}, which is installed but failed to import: "
                          f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a library whose import raises anything else is just as broken
        raise ImportError(f"fastadapter.integrations needs {package}, which is installed but failed to import: "
                          f"{type(exc).__name__}: {exc}") from exc
    check_version(package, getattr(module, "__version__", "unknown"))
    return module
