"""Lesson checks (helpers.checks) and the seed switch the robustness sweep uses (helpers.env.course_seed)."""
import json

import pytest

from helpers.checks import lesson_check, strict
from helpers.env import course_seed


def test_a_held_check_prints_a_tick_and_both_numbers(capsys, monkeypatch):
    monkeypatch.setenv("COURSE_CHECKS_STRICT", "1")
    assert lesson_check("loss halves", 0.31, 0.5, op="<=") is True
    assert capsys.readouterr().out.strip() == "✓ loss halves: 0.31 <= 0.5"


def test_a_failed_check_says_what_it_means_and_raises_only_when_strict(capsys, monkeypatch):
    monkeypatch.setenv("COURSE_CHECKS_STRICT", "0")
    assert lesson_check("beats the base", 12.0, 20.0, unit="%", meaning="train longer") is False
    out = capsys.readouterr().out
    assert out.startswith("✗ beats the base: 12 >= 20 (%)") and "✗ means: train longer" in out
    monkeypatch.setenv("COURSE_CHECKS_STRICT", "1")
    with pytest.raises(AssertionError, match="beats the base: 12 >= 20"):
        lesson_check("beats the base", 12.0, 20.0, unit="%")


def test_a_timing_check_reports_but_never_raises(capsys, monkeypatch):
    monkeypatch.setenv("COURSE_CHECKS_STRICT", "1")
    assert lesson_check("grouping speeds a step up", 0.9, 1.2, unit="x", timing=True) is False
    assert capsys.readouterr().out.startswith("✗ grouping speeds a step up: 0.9 >= 1.2 (x)")


def test_strict_by_default_only_at_test_size_on_the_standin(monkeypatch):
    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COURSE_SMOKE", "1")
    assert strict()  # offline, the default model resolves to the stand-in
    monkeypatch.setenv("COURSE_SMOKE", "0")
    assert not strict()  # a learner's size: a verdict, never a traceback


def test_checks_are_logged_with_their_margin(tmp_path, monkeypatch):
    log = tmp_path / "checks.jsonl"
    monkeypatch.setenv("COURSE_CHECKS_STRICT", "0")
    monkeypatch.setenv("COURSE_CHECKS_LOG", str(log))
    monkeypatch.setenv("COURSE_NOTEBOOK", "03_x")
    lesson_check("a", 30.0, 20.0)
    lesson_check("b", 0.7, 0.5, op="<=")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["claim"], r["held"], round(r["margin"], 6), r["notebook"]) for r in rows] == [
        ("a", True, 10.0, "03_x"), ("b", False, -0.2, "03_x")]


def test_unknown_comparison_is_refused():
    with pytest.raises(ValueError, match="op must be one of"):
        lesson_check("x", 1, 2, op="=>")


def test_course_seed(monkeypatch):
    monkeypatch.delenv("COURSE_SEED", raising=False)
    assert course_seed() == 42 and course_seed(7) == 7
    monkeypatch.setenv("COURSE_SEED", "3")
    assert course_seed() == 3
    monkeypatch.setenv("COURSE_SEED", "three")
    with pytest.raises(ValueError, match="COURSE_SEED must be an integer, got 'three'"):
        course_seed()
