"""Model tooling: loading, packages, compression, fitting, evaluation, planning, text, benchmarks."""
