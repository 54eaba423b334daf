"""`sdtune report`: one self-contained HTML page for a run: its config, curves, sample grids, validation loss and
files (`sdtune.report`)."""

from __future__ import annotations

from pathlib import Path

from sdtune.commands.options import command_parser
from sdtune.errors import SdtuneError

DESCRIPTION = ("Write one self-contained HTML page for a training run: config, loss and learning-rate curves, sample "
               "grids by step, validation loss, adapter files.")
EPILOG = """examples:
  sdtune report runs/my_lora                          # writes runs/my_lora/report.html
  sdtune report runs/my_lora --out reports/my_lora.html

RUN is the run directory of `sdtune fit` (its --trainer.default_root_dir). The page is one HTML file with
everything inline (images, curves, a little JavaScript; no server, nothing fetched): the loss, learning-rate and
other curves from logs/, the sample grids of every step side by side with a slider, the validation loss, the
adapter files with their sizes and the tools that read them, and config.yaml. A run still training can be reported
at any time: what it has not written yet is shown as missing.
"""


def main(args: list[str]) -> int:
    parser = command_parser("report", DESCRIPTION, EPILOG)
    parser.add_argument("run", metavar="RUN", help="run directory of `sdtune fit`")
    parser.add_argument("--out", metavar="FILE.html", help="where to write the page (default: RUN/report.html)")
    ns = parser.parse_args(args)
    out = Path(ns.out).expanduser() if ns.out else Path(ns.run).expanduser() / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise SdtuneError(f"--out {out}: the page is written to a .html file; give a name ending in .html")
    if out.is_dir():
        raise SdtuneError(f"--out {out} is a folder; give a file name ending in .html")
    from sdtune.report import curve_tags, read_run, write_report

    run = read_run(ns.run)
    write_report(run, out)
    print(f"wrote {out} ({len(run.grids)} sample grids, {len(curve_tags(run.scalars))} curves, {len(run.outputs)} files)")
    return 0
