"""r1edge public API: load models and packages, compress checkpoints, run controllers."""
