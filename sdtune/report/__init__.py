"""`sdtune report`: one self-contained HTML page per run directory, from the files the run wrote (run.py reads them,
page.py draws the page)."""

from sdtune.report.page import curve_tags, render, write_report
from sdtune.report.run import Run, read_run

__all__ = ["Run", "curve_tags", "read_run", "render", "write_report"]
