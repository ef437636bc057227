"""The CUDA engine: int8 GEMMs, the grouped expert kernel and the expert store."""
