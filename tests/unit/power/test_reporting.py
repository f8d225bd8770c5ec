"""The report gate: which samples are worth an API write."""

from __future__ import annotations

from ampacity.power.reporting import ReportGate

MAX = {"a": 700.0, "b": 700.0}


def test_power_within_the_deadband_waits_for_the_heartbeat() -> None:
    gate = ReportGate()
    assert gate.is_news(0.0, "k", {"a": 300.0, "b": 300.0}, MAX, 10.0)
    assert not gate.is_news(1.0, "k", {"a": 320.0, "b": 290.0}, MAX, 10.0)
    assert gate.is_news(5.0, "k", {"a": 320.0, "b": 290.0}, MAX, 10.0)  # half the staleness


def test_a_surge_a_new_key_or_a_failed_write_is_news_at_once() -> None:
    gate = ReportGate()
    assert gate.is_news(0.0, "k", {"a": 300.0, "b": 300.0}, MAX, 10.0)
    assert gate.is_news(1.0, "k", {"a": 700.0, "b": 300.0}, MAX, 10.0)  # one GPU beyond 15 %
    assert gate.is_news(2.0, "limits changed", {"a": 700.0, "b": 300.0}, MAX, 10.0)
    gate.failed()
    assert gate.is_news(2.5, "limits changed", {"a": 700.0, "b": 300.0}, MAX, 10.0)


def test_a_sample_the_operator_has_the_fast_way_is_written_on_the_long_heartbeat() -> None:
    gate = ReportGate()
    assert gate.is_news(0.0, "k", {"a": 300.0, "b": 300.0}, MAX, 10.0, offloaded=True)
    assert not gate.is_news(30.0, "k", {"a": 300.0, "b": 300.0}, MAX, 10.0, offloaded=True)
    assert gate.is_news(60.0, "k", {"a": 300.0, "b": 300.0}, MAX, 10.0, offloaded=True)
    # The deadband still writes real changes into the slow view.
    assert gate.is_news(61.0, "k", {"a": 650.0, "b": 300.0}, MAX, 10.0, offloaded=True)
