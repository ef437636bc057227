"""The advisor example's closed-loop states: what the live advisor meets, labelled as run.py judges."""
from __future__ import annotations

import numpy as np


def test_a_heater_fault_in_the_closed_loop_is_labelled_from_its_onset():
    from examples.advisor import live as L, states as S
    from examples.advisor.train import load_deploy

    rng = np.random.default_rng(0)
    got = L.episode(11, rng, 12.0, every_s=0.5, kind="heater", fault_at=5.0, capacity=0.3, advise_from=np.inf)
    assert len(got) >= 15
    _, template, _ = load_deploy()
    times = []
    for context, truth in got:
        assert context["cycles"] == S.HISTORY and set(context["stats"]) >= set(S.INPUTS) | set(S.OUTPUTS)
        assert truth in ("normal", "leak", "heater_fault")
        times.append((context["seconds"], truth))
        assert "over a sound element" in template.render(context)
    truths = [t for _, t in got]
    assert "heater_fault" in truths and truths.index("heater_fault") > 0       # none before the onset
    # seconds after the onset the element works at its limit (whatever else happens, e.g. a leak)
    assert all(S.heater_excess(c) > 0.3 and c["stats"]["heater"]["mean"] > 0.95 for c, _ in got[-5:])


def test_an_unsaturated_heater_fault_keeps_the_setpoints_a_saturated_one_lowers_temp_sp():
    from examples.advisor import states as S

    def context(temp: float) -> dict:
        stat = lambda v: {"mean": v, "min": v, "max": v, "first": v, "last": v}  # noqa: E731
        return {"plc": {"level_sp": 0.5, "temp_sp": 45.0}, "stats": {
            "temperature": stat(temp), "level": stat(0.5), "level_err": stat(0.0), "valve": stat(0.57),
            "heater": stat(0.9), "inflow_temp": stat(15.0)}}

    holding = S.right_answer(context(44.8), "heater_fault")
    assert holding == {"diagnosis": "heater_fault", "level_sp": 0.5, "temp_sp": 45.0}
    assert "holding. keep" in S.reasoning(context(44.8), holding)
    falling = S.right_answer(context(41.37), "heater_fault")
    assert falling["temp_sp"] == 41.0 and "set 41" in S.reasoning(context(41.37), falling)


def test_episode_refuses_unknown_events():
    import pytest

    from examples.advisor import live as L

    with pytest.raises(ValueError, match="unknown episode events \\['capcity'\\]; known: advise_from, capacity"):
        L.episode(0, np.random.default_rng(0), 5.0, capcity=0.3)
