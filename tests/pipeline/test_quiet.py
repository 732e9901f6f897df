"""A quiet console: lm-eval's notices off unless verbose; a rerun re-renders a report only when needed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pipeline.evals.lmeval import quiet_lm_eval, verbose
from pipeline.run import report_is_current


def test_report_is_current_only_when_newer_than_its_rows_and_the_analysis(tmp_path: Path):
    study = tmp_path / "study"
    (study / "report").mkdir(parents=True)
    rows = study / "abc.parquet"
    rows.write_bytes(b"x")
    assert not report_is_current(study)  # no report yet
    summary = study / "report" / "summary.md"
    summary.write_text("# report")
    newest = max(p.stat().st_mtime for p in Path("analysis").glob("*.py"))
    os.utime(rows, (newest - 10, newest - 10))
    os.utime(summary, (newest + 10, newest + 10))
    assert report_is_current(study)
    os.utime(rows, (newest + 20, newest + 20))  # a new result: render again
    assert not report_is_current(study)
    os.utime(rows, (newest - 10, newest - 10))
    os.utime(summary, (newest - 5, newest - 5))  # an analysis module newer than the report
    assert not report_is_current(study)


@pytest.mark.parametrize(("value", "expected"), [("", False), ("0", False), ("1", True)])
def test_lm_eval_notices_follow_verbose(monkeypatch, value, expected):
    monkeypatch.setenv("KBIT_VERBOSE", value)
    logger = logging.getLogger("lm_eval")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    assert verbose() is expected
    quiet_lm_eval()
    assert (logger.level == logging.ERROR) is not expected
