"""The model and its rules: configuration, the reference PyTorch transformer (MLA, MoE, RoPE),
routing, int8 quantization and checkpoint reading. Every engine is a backend checked against it."""
