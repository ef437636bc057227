"""r1edge public API: load models and packages, compress checkpoints, run controllers.

The public names are imported on first use (a module ``__getattr__``), so commands that need no
model (``r1edge --help``, ``plan``, ``keys``, ``opcua-user``) start without loading torch.
"""
from importlib import import_module

_PUBLIC = {
    "Controller": "sdk.service.controller",
    "TextGenerator": "sdk.tools.text",
    "compress": "sdk.tools.compress",
    "load_model": "sdk.tools.loading",
    "load_tokenizer": "sdk.tools.text",
}
_SUBMODULES = ("cli", "demo", "service", "tools")

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """Import a public name (or subpackage) the first time it is asked for."""
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
    elif name in _SUBMODULES:
        value = import_module(f"sdk.{name}")
    else:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBMODULES))
