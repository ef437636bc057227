"""r1edge public API: load models and packages, compress checkpoints, run controllers."""
from sdk.loading import load_model

__all__ = ["load_model"]
