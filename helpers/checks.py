"""Lesson checks: how well a model learned, printed as ✓ or ✗ with the measured value and the bar.

A notebook checks two kinds of things. Whether code is right (our LoRA equals peft's, our NF4 codes equal
bitsandbytes') does not depend on the model: those stay plain `assert`s. How well a model learned depends on
the model, the data, the number of steps and even the CPU's kernels, so it is a *lesson check*: it prints

    ✓ LoRA beats the base model by 30 points: 61.3 >= 30 (points of accuracy)

or a ✗ with what that means, and the notebook goes on. It raises only where its bar was measured: at test
size (`COURSE_SMOKE=1`) on the course's offline stand-in model, the run `make test` does. Each bar sits below
the worst case of a sweep over seeds, kernel paths and thread counts (`python -m benchmarks.robustness`; the
table is in the lesson of each notebook), so a ✗ there means the lesson stopped being true.

A check of a *time* (a speed-up, an overhead) never raises: a clock measures the machine's load as much as the
code, so speed targets live in `benchmarks/` and a timing check only tells the reader what this run saw.

`COURSE_CHECKS_STRICT=0|1` overrides when a ✗ raises; `COURSE_CHECKS_LOG=<file>` appends every check as a
JSON line (the sweep reads them). Taught in notebooks/02_lora_training.ipynb.
"""
from __future__ import annotations

import json
import os

from .env import smoke

_OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


def strict() -> bool:
    """Whether a failed lesson check raises: at test size on the stand-in, unless COURSE_CHECKS_STRICT says."""
    value = os.environ.get("COURSE_CHECKS_STRICT", "").strip().lower()
    if value in ("0", "1", "true", "false", "yes", "no"):
        return value in ("1", "true", "yes")
    if not smoke():
        return False
    from .models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL).standin


def lesson_check(claim: str, value: float, bar: float, *, op: str = ">=", unit: str = "", meaning: str = "",
                 timing: bool = False) -> bool:
    """Print ✓ or ✗ for `value op bar`, with both numbers; return whether it held.

    claim: what the notebook teaches, as a sentence ("LoRA beats the base model by 30 points").
    meaning: what a ✗ means and what to try (printed only with a ✗).
    timing: the value is measured with a clock; its ✗ is printed, never raised.
    Raises AssertionError on a ✗ only when `strict()` (the test run on the stand-in) and not `timing`.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    value, bar = float(value), float(bar)
    held = _OPS[op](value, bar)
    suffix = f" ({unit})" if unit else ""
    line = f"{'✓' if held else '✗'} {claim}: {value:.4g} {op} {bar:.4g}{suffix}"
    if not held and meaning:
        line += f"\n  ✗ means: {meaning}"
    print(line)
    log = os.environ.get("COURSE_CHECKS_LOG")
    if log:
        margin = value - bar if op in (">=", ">") else bar - value
        with open(log, "a", encoding="utf-8") as file:
            file.write(json.dumps({"notebook": os.environ.get("COURSE_NOTEBOOK", ""), "claim": claim, "value": value,
                                   "bar": bar, "op": op, "margin": margin, "held": held,
                                   "timing": timing}, ensure_ascii=False) + "\n")
    if not held and not timing and strict():
        raise AssertionError(f"lesson check failed at test size on the stand-in, where its bar was measured: {line}")
    return held
