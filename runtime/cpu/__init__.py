"""The CPU stream engine: int8 kernels compiled with Numba, batched steps and prefill over
per-stream caches, greedy decoding, and expert parallelism over torch.distributed."""
