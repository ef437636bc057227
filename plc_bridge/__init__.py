"""Modbus TCP and ZeroMQ I/O for r1edge: register maps, codecs, servers and clients.

This package never imports ``runtime`` or torch.
"""
