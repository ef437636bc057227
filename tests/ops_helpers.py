"""Deployments of the bundled factory policy for the operations tests (metrics, notify, OPC UA):
the demo's own inputs, outputs and limits, without its Modbus table."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sdk" / "demo"
#: A valid frame of the factory deployment's inputs: the policy's, then the actuators' positions
#: its outputs track and the manual/auto switch (auto).
GOOD = {"level": 0.5, "temperature": 40.0, "level_sp": 0.55, "temp_sp": 42.0, "level_err": 0.05,
        "temp_err": 2.0, "inflow_temp": 20.0, "valve_pos": 0.5, "heater_pos": 0.3, "auto": 1.0}


def factory_deploy(tmp_path: Path, *, period_ms: float = 20.0, extra: str = "", units: bool = False) -> Path:
    """A deployment TOML of the bundled factory package at ``period_ms`` with ``extra`` appended
    (bridges, ``[metrics]``, ``[recorder]``); ``units`` adds engineering units to the signals."""
    text = (DEMO / "deploy.toml").read_text()
    text = text[:text.index("[modbus]")]
    text = text.replace('path = "model"', f'path = "{DEMO / "model"}"')
    text = re.sub(r"period_ms = \d+", f"period_ms = {period_ms}", text)
    text = re.sub(r"deadline_ms = \d+", f"deadline_ms = {period_ms}", text)
    if units:
        for name, unit in (("level", "m"), ("temperature", "degC"), ("valve", "1")):
            text = text.replace(f'name = "{name}"', f'name = "{name}"\nunit = "{unit}"', 1)
    path = tmp_path / "deploy.toml"
    path.write_text(text + "\n" + extra)
    return path
