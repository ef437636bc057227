"""r1edge public API: load models and packages, compress checkpoints, run controllers."""
from sdk.compress import compress
from sdk.controller import Controller
from sdk.loading import load_model

__all__ = ["Controller", "compress", "load_model"]
