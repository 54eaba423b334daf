"""`sdtune report`: one self-contained HTML page per run directory, from the files the run wrote (run.py reads them,
page.py draws the page)."""

from sdtune.report.page import render, write_report
from sdtune.report.run import Run, read_run

__all__ = ["Run", "read_run", "render", "write_report"]
