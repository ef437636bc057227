"""Modbus TCP, ZeroMQ and OPC UA I/O for r1edge: register maps, codecs, servers and clients.

This package never imports ``runtime`` or torch.

- :mod:`plc_bridge.bridge` — :class:`~plc_bridge.bridge.Bridge`, the one interface the
  controller sees (start, stop, serves, bound streams, one ``read`` and one ``write`` a cycle
  through preallocated images, health), the optional :class:`~plc_bridge.bridge.Reporter`
  and :class:`~plc_bridge.bridge.ModeSwitch`, and the registry that builds each bridge from
  its deployment section (:func:`~plc_bridge.bridge.build_bridge`).
- :mod:`plc_bridge.registers` — register map entries, value codecs (int16/uint16/int32/uint32/
  float32, ABCD/CDAB word order, scale and offset), validation at load, read/write planning.
- :mod:`plc_bridge.modbus` — :class:`~plc_bridge.modbus.ModbusBridge`: one stream; server mode (the
  PLC writes inputs and reads outputs) and client mode (we poll the PLC), with heartbeat,
  fail-safe outputs, allow-list, idle timeout and eviction, per-connection request budget,
  capped reconnect backoff and supervised I/O tasks.
- :mod:`plc_bridge.mbap` — Modbus TCP on the wire: MBAP frames, request and answer PDUs,
  every check a peer's bytes go through, and the client connection.
- :mod:`plc_bridge.modbus_tls` — Modbus/TCP Security: ``[modbus.tls]``, TLS contexts, the role
  in a client certificate, and the certificates behind ``r1edge modbus-cert``.
- :mod:`plc_bridge.messages` — the msgpack message schemas and their hostile-input decoders.
- :mod:`plc_bridge.zmq_bridge` — :class:`~plc_bridge.zmq_bridge.ZmqBridge` (SUB for sensor
  frames, XPUB for decisions, ROUTER for control, optional CURVE), the matching clients, and
  :func:`~plc_bridge.zmq_bridge.make_keys` behind ``r1edge keys``.
- :mod:`plc_bridge.opcua` — :class:`~plc_bridge.opcua.OpcUaBridge`: an OPC UA server (asyncua)
  for the streams it lists, with screened writes, supervised tasks and quiet library logs.
- :mod:`plc_bridge.opcua_security` — who may talk to it: the users file (passwords, roles,
  client certificates mapped to roles), sessions decided and counted, live trust, and the
  certificates behind ``r1edge opcua-cert``.
- :mod:`plc_bridge.metrics` — counters and latency rings behind each bridge's ``health()``, and
  :class:`~plc_bridge.metrics.CollapsingLog` for repeated warnings.
"""
