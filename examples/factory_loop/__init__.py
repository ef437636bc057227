"""The factory loop example: a heated-tank plant served over Modbus, its expert controller,
and the data that teaches a sensor-mode MoE policy to imitate that expert."""
