"""Which ONNX Runtime flavor is installed, and clear errors when the needed one is not.

graphslim runs on either ``onnxruntime`` (extra ``ort``: the current inference build) or
``onnxruntime-training`` 1.19.2 (extra ``training``: inference plus the on-device training API the
``distill`` pass needs, with torch 2.13.0). Both distributions own the same ``onnxruntime/``
package directory, and pip does not notice when both are installed: whichever was installed last
wins, and removing either breaks the other. So they are mutually exclusive extras, and this
module names the problem when both are present.
"""

from __future__ import annotations

import logging
from importlib import metadata
from types import ModuleType

from graphslim.errors import GraphslimError

__all__ = ["installed_flavors", "require_onnxruntime", "require_training"]

log = logging.getLogger(__name__)

_FIX = ("pip uninstall -y onnxruntime onnxruntime-training && "
        "pip install 'graphslim[ort]' (or 'graphslim[training]' for distill)")


def installed_flavors() -> list[str]:
    found = []
    for dist in ("onnxruntime", "onnxruntime-training", "onnxruntime-gpu"):
        try:
            metadata.distribution(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def require_onnxruntime() -> ModuleType:
    """Import onnxruntime, or fail with the install command."""
    flavors = installed_flavors()
    if len(flavors) > 1:
        log.warning("both %s are installed; they share one package directory and break each other. Fix: %s",
                    " and ".join(flavors), _FIX)
    try:
        import onnxruntime
    except ImportError as e:
        raise GraphslimError(f"ONNX Runtime is not installed or broken ({e}); install it with "
                             "pip install 'graphslim[ort]' (or 'graphslim[training]')") from None
    return onnxruntime


def require_training() -> ModuleType:
    """Import onnxruntime.training (the distill pass needs it), or fail naming the extra."""
    ort = require_onnxruntime()
    # Before the training environment exists: its graph transformers log at INFO otherwise.
    ort.set_default_logger_severity(3)
    try:
        import onnxruntime.training.api  # noqa: F401 - imports torch as well
        from onnxruntime.training import artifacts, onnxblock  # noqa: F401
    except ImportError as e:
        hint = (f" Both onnxruntime and onnxruntime-training are installed and the inference build won. Fix: {_FIX}"
                if {"onnxruntime", "onnxruntime-training"} <= set(installed_flavors()) else "")
        raise GraphslimError("the distill pass needs onnxruntime-training: pip install 'graphslim[training]' "
                             f"(onnxruntime-training 1.19.2 and torch 2.13.0, in place of onnxruntime) [{e}].{hint}"
                             ) from None
    import onnxruntime.training

    return onnxruntime.training
