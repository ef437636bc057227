"""The perception-hook example: ``Controller.step`` inside someone else's 50 Hz perception
loop, a brake advisory with a deadline and a fail-safe."""
