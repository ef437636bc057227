"""The sensor-stream example: 16 machines' vibration features over ZeroMQ, one controller
batching them through the engine, faults detected and scored per machine."""
