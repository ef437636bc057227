"""The deterministic engine: model, routing, int8, experts, streams and the periodic loop.

This package never imports ``sdk`` or ``plc_bridge`` and does no networking.
"""
