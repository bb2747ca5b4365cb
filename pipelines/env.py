"""The switches bigopt reads from the environment, parsed in one place (no Spark, no lake
imports), so that ``bigopt`` checks them as it starts: a bad value is one line and exit 2
before anything runs, not a traceback after Spark has started, nor silently another meaning."""
from __future__ import annotations

import os

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
DELTA_ENGINES = ("auto", "native", "deltars")


class EnvSettingError(ValueError):
    """An environment variable bigopt reads holds a value it does not take; the message names both."""


def spark_ui() -> bool:
    """``BIGOPT_SPARK_UI``: Spark's web UI on (1, true, yes, on) or off (0, false, no, off; any
    case); unset or empty: on, except under pytest. Until the twenty-eighth session only ``1``
    meant on, so ``BIGOPT_SPARK_UI=true`` turned the UI off without a word."""
    value = os.environ.get("BIGOPT_SPARK_UI", "").strip().lower()
    if not value:
        return not os.environ.get("PYTEST_CURRENT_TEST")
    if value not in _ON + _OFF:
        raise EnvSettingError(f"BIGOPT_SPARK_UI={os.environ['BIGOPT_SPARK_UI']!r}: expected one of "
                              f"{', '.join(_ON)} (the UI on) or {', '.join(_OFF)} (off)")
    return value in _ON


def delta_engine_choice() -> str:
    """``BIGOPT_DELTA_ENGINE``: auto (unset or empty), native or deltars, any case. Until the
    twenty-eighth session another value was a ValueError traceback once Spark had started."""
    choice = os.environ.get("BIGOPT_DELTA_ENGINE", "").strip().lower() or "auto"
    if choice not in DELTA_ENGINES:
        raise EnvSettingError(f"BIGOPT_DELTA_ENGINE={os.environ['BIGOPT_DELTA_ENGINE']!r}: expected auto, native "
                              "or deltars (any case)")
    return choice


def check_environment() -> None:
    """Raise :class:`EnvSettingError` for the first switch above that holds a value it does not take."""
    spark_ui()
    delta_engine_choice()
