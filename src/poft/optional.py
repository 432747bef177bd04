"""Optional dependencies: import one, or end with a one-line DependencyError naming the extra to install.

The library itself needs torch, transformers, TRL and datasets; plots, report.html, the demo's intervals,
LoRA and quantized loading each need a package of their own, installed with an extra (`poft[report]`,
`poft[peft]`, `poft[quantization]`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from poft.errors import DependencyError


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`module`, imported; where it (or a package it needs) is missing, a DependencyError with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = (error.name or module).partition(".")[0]  # the package, not one of its modules
        raise DependencyError(
            f"{feature} needs {missing}, which is not installed: pip install 'poft[{extra}]'."
        ) from error


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the headless Agg backend (reports are files, never windows)."""
    require("matplotlib", "report", "Plotting").use("Agg")
    return require("matplotlib.pyplot", "report", "Plotting")


def check_model_extras(model_args) -> None:
    """Before any model is loaded: peft is installed where LoRA is asked for (bitsandbytes, with the device it
    needs, is `runtime.quantization_config`'s check)."""
    if getattr(model_args, "use_peft", False):
        require("peft", "peft", "--use_peft (LoRA)")
