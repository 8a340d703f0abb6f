"""The bench's media workload verdict (tests/bench/media.py): when a meter fell behind."""

from __future__ import annotations

from typing import Any

from tests.bench import media


def reports(start: float, end: float, every: float = 0.25, audio: float = 1.0) -> list[Any]:
    """Reports every ``every`` s from start to end, having metered ``audio`` x real time."""
    out = []
    t, seq = start, 0
    while t <= end:
        seq += 1
        out.append([t, seq, round((t - start) * media.SAMPLE_RATE * audio)])
        t += every
    return out


def sent(start: float, end: float, pace: float = 1.0) -> list[Any]:
    """An observer's log: a second of tone handed over every 1/pace s."""
    return [[start + i / pace, i * media.SAMPLE_RATE] for i in range(int((end - start) * pace))]


def test_a_meter_on_time_is_not_behind() -> None:
    verdict = media.verdict(reports(99.9, 111), sent(95, 112), 100.0, 110.0)
    assert verdict["behind"] is False, verdict
    assert verdict["report_ratio"] >= 0.97
    assert verdict["max_gap_s"] <= 0.26
    assert verdict["audio_ratio"] == verdict["sent_ratio"] == 1.0


def test_slow_reports_a_gap_or_slow_audio_is_behind() -> None:
    tone = sent(95, 112)
    slow = media.verdict(reports(100, 110, every=0.3), tone, 100.0, 110.0)
    assert slow["behind"] and "reports of 40 due" in slow["why"]
    gappy = [r for r in reports(100, 110) if not 104 < r[0] < 105]
    gap = media.verdict(gappy, tone, 100.0, 110.0)
    assert gap["behind"] and "gap" in gap["why"] and gap["report_ratio"] > 0.9
    lagging = media.verdict(reports(100, 110, audio=0.8), tone, 100.0, 110.0)
    assert lagging["behind"] and "0.80x the audio sent" in lagging["why"]
    silent = media.verdict([[r[0], r[1], None] for r in reports(100, 110)], tone, 100.0, 110.0)
    assert silent["behind"] and silent["why"] == "no audio metered"


def test_a_starved_observer_does_not_make_its_meter_behind() -> None:
    verdict = media.verdict(reports(100, 110, audio=0.7), sent(95, 112, pace=0.7), 100, 110)
    assert verdict["behind"] is False, verdict
    assert verdict["sent_ratio"] == 0.7


def test_summary_counts_rooms_without_reports_as_behind() -> None:
    observed = {"a": {"reports": reports(100, 110), "sent": sent(95, 112)}}
    got = media.summarise(["a", "b"], observed, 100.0, 110.0)
    assert got["jobs_behind"] == 1
    assert list(got["behind"]) == ["b"]
    assert got["min_report_rate"] == 0.0
    assert got["min_audio_ratio"] == got["min_sent_ratio"] == 1.0
