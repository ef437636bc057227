"""Prometheus metrics and /healthz, scraped over HTTP while the controller runs at 1 kHz on the
bundled factory policy: every counter agrees with stats(), at every scrape and at the end."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.control.safety import INVALID_NAMES, REASON_NAMES
from sdk.service.config import ConfigError, DeployConfig
from sdk.service.controller import Controller
from tests.conftest import wait_for
from tests.ops_helpers import GOOD, ROOT, factory_deploy


def scrape(port: int) -> dict:
    """``{(name, labels): value}`` of one scrape of /metrics (a real HTTP request)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample_names(port: int) -> set[str]:
    """Every sample name the exporter can produce (from its families, empty ones included)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {fam.name + sfx for fam in text_string_to_metric_families(text) for sfx in suffixes[fam.type]}


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def expected(stats: dict, ctrl: Controller) -> dict:
    """The metric values stats() implies."""
    want = {("r1edge_cycles_total", ()): stats["cycles"],
            ("r1edge_deadline_misses_total", ()): stats["deadline_misses"],
            ("r1edge_skipped_ticks_total", ()): stats["skipped_ticks"],
            ("r1edge_cycle_latency_seconds_count", (("phase", "total"),)): stats["latency_us"]["count"],
            ("r1edge_heartbeat", ()): stats["heartbeat"]}
    for reason in REASON_NAMES[1:]:
        want[("r1edge_failsafe_cycles_total", (("reason", reason),))] = stats["failsafe_cycles_by_reason"][reason]
        want[("r1edge_held_cycles_total", (("reason", reason),))] = stats["held_cycles_by_reason"][reason]
    for signal, by_reason in stats["invalid_inputs_by_signal"].items():
        for reason, n in by_reason.items():
            want[("r1edge_invalid_inputs_total", (("reason", reason), ("signal", signal)))] = n
    for phase in ("read", "infer", "write", "record"):
        want[("r1edge_cycle_latency_seconds_count", (("phase", phase),))] = stats["phases_us"][phase]["count"]
    for name, value in zip(ctrl.output_names, ctrl.cycle.out[ctrl.slots["main"]].tolist()):
        want[("r1edge_output", (("name", name), ("stream", "main")))] = value
    return want


def test_scrapes_match_stats_while_the_loop_runs_at_1khz(tmp_path):
    deploy = factory_deploy(tmp_path, period_ms=1.0, extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    mode = {"inputs": "good"}

    def source(seq, t_ns):
        frame = dict(GOOD)
        if mode["inputs"] == "stale":
            frame["level"] = (0.5, t_ns - 10**9)            # measured a second ago
        elif seq % 97 == 0:
            frame["level"] = float("nan")                   # fail-safe: invalid_input
        elif seq % 89 == 0:
            frame["inflow_temp"] = 500.0                    # out of range; on_invalid = "hold"
        return frame

    with Controller.from_config(deploy) as ctrl:
        port = ctrl.metrics.port
        assert healthz(port) == (503, {"status": "unhealthy", "problems": ["the control loop is not running"]})
        runner = threading.Thread(target=ctrl.run, kwargs={"duration_s": 30.0, "source": source})
        runner.start()
        try:
            assert wait_for(lambda: ctrl.counters["cycles"] > 300, timeout=60)
            assert wait_for(lambda: healthz(port)[0] == 200, timeout=10)
            scraped_cycles = []
            while len(scraped_cycles) < 20:                  # every 100 ms while it runs
                before = ctrl.counters["cycles"]
                got = scrape(port)
                after = ctrl.counters["cycles"]
                if got[("r1edge_up", ())] == 0.0:            # no cycle boundary within 250 ms: an overloaded
                    continue                                 # machine stalled the loop; /healthz said so too
                n = got[("r1edge_cycles_total", ())]
                assert before <= n <= after
                # One scrape is one instant between two cycles: its counts agree with each other.
                assert got[("r1edge_cycle_latency_seconds_count", (("phase", "total"),))] == n
                assert got[("r1edge_up", ())] == 1.0
                scraped_cycles.append(n)
                time.sleep(0.1)
            assert scraped_cycles == sorted(scraped_cycles) and scraped_cycles[-1] > scraped_cycles[0]
            assert wait_for(lambda: healthz(port)[0] == 200, timeout=10)
            assert healthz(port)[1]["streams"]["main"]["status"] in ("ok", "failsafe", "hold")
            mode["inputs"] = "stale"
            assert wait_for(lambda: healthz(port)[0] == 503, timeout=10)
            assert "stale or missing" in healthz(port)[1]["problems"][0]
            mode["inputs"] = "good"
            assert wait_for(lambda: healthz(port)[0] == 200, timeout=10)
        finally:
            ctrl.stop()
            runner.join()
        stats = ctrl.stats()
        final = scrape(port)
        names = sample_names(port)
        want = expected(stats, ctrl)
        assert {k: final[k] for k in want} == want
        # The scrape's buckets are the controller's own histogram, cumulated.
        buckets = sorted((float(dict(k[1])["le"]), v) for k, v in final.items()
                         if k[0] == "r1edge_cycle_latency_seconds_bucket" and dict(k[1])["phase"] == "total")
        assert buckets[-1] == (float("inf"), stats["cycles"])
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)
        below_p50 = max(v for le, v in buckets if le * 1e6 < stats["latency_us"]["p50"] / 1.2)
        assert below_p50 <= stats["cycles"] / 2
    # The run had every kind of cycle the test asked for.
    assert stats["failsafe_cycles_by_reason"]["invalid_input"] > 0
    assert stats["held_cycles_by_reason"]["invalid_input"] > 0
    by_signal = stats["invalid_inputs_by_signal"]
    assert by_signal["level"]["nan"] > 0 and by_signal["level"]["stale"] > 0 and by_signal["inflow_temp"]["range"] > 0
    for k in range(1, len(INVALID_NAMES)):
        reason = INVALID_NAMES[k]
        assert sum(row[reason] for row in by_signal.values()) == stats["invalid_inputs"][reason]
    assert final[("r1edge_up", ())] == 0.0
    # The example Grafana dashboard asks only for metrics the exporter has.
    dashboard = (ROOT / "examples" / "ops" / "grafana-dashboard.json").read_text()
    wanted = set(re.findall(r"\br1edge_[a-z_]+", dashboard))
    assert wanted and wanted <= names, wanted - names


def test_healthz_says_stalled_while_a_cycle_hangs(tmp_path):
    deploy = factory_deploy(tmp_path, period_ms=10.0, extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    hang, stuck, release = threading.Event(), threading.Event(), threading.Event()

    def source(seq, t_ns):
        if hang.is_set() and not release.is_set():
            stuck.set()
            release.wait(10)                                # the loop is stuck in this cycle
        return dict(GOOD)

    with Controller.from_config(deploy) as ctrl:
        port = ctrl.metrics.port
        runner = threading.Thread(target=ctrl.run, kwargs={"duration_s": 30.0, "source": source})
        runner.start()
        try:
            assert wait_for(lambda: healthz(port)[0] == 200, timeout=60)
            hang.set()
            assert stuck.wait(10)
            status, body = healthz(port)
            assert status == 503 and body["problems"] == ["the control loop did not answer (stalled)"]
            assert scrape(port)[("r1edge_up", ())] == 0.0
            release.set()
            assert wait_for(lambda: healthz(port)[0] == 200, timeout=10)
        finally:
            release.set()
            ctrl.stop()
            runner.join()


@pytest.mark.parametrize("listen, message", [
    ("localhost", "metrics.listen must be HOST:PORT"),
    ("127.0.0.1:70000", "metrics.listen must be HOST:PORT"),
])
def test_metrics_listen_is_checked(tmp_path, listen, message):
    deploy = factory_deploy(tmp_path, extra=f'[metrics]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match=f"deploy.toml: {message}"):
        DeployConfig.load(deploy)


def test_metrics_ipv6_listen_parses(tmp_path):
    cfg = DeployConfig.load(factory_deploy(tmp_path, extra='[metrics]\nlisten = "[::1]:9200"\n'))
    assert (cfg.metrics.host, cfg.metrics.port) == ("::1", 9200)
