"""The torch-free control side: the periodic loop, input and output safety, the flight recorder.

Nothing here imports torch; numpy and msgpack only."""
