"""One self-contained HTML page for a run (`sdtune report`): no server, no network, nothing fetched. The curves are
SVG drawn here, the grids are inline PNGs (base64), and a few lines of plain JavaScript move a slider over the steps.

When every grid has decoded, the page sets `data-grids-decoded` (and `data-grids`, their number) on `<body>`: a
headless browser's `--dump-dom` shows whether each grid really displays.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
from pathlib import Path

from sdtune.export.inspect import human_size
from sdtune.report.run import OutputFile, Run

WIDTH, HEIGHT = 520, 200  # one curve's SVG, in pixels: two side by side on a laptop's screen
MARGIN = {"left": 76, "right": 16, "top": 12, "bottom": 28}
TICKS = 5
MAX_POINTS = 2000  # per curve
# Scalars Lightning logs that say nothing about the run: TensorBoard's hparams placeholder (-1) and the epoch.
NOT_CURVES = ("hp_metric", "epoch")
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.muted { color: #777; } .missing { color: #a60; }
.curves { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 2px; }
svg text { font: 11px system-ui, sans-serif; fill: #555; }
#strip { display: flex; gap: 12px; overflow-x: auto; padding-bottom: 8px; }
#strip figure { flex: none; padding: 4px; border: 2px solid transparent; }
#strip figure.selected { border-color: #36c; }
#strip img { display: block; max-height: 60vh; max-width: 90vw; image-rendering: pixelated; }
table { border-collapse: collapse; } td, th { border-bottom: 1px solid #ddd; padding: 3px 10px 3px 0; text-align: left;
  vertical-align: top; } td.number { text-align: right; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
"""
SCRIPT = """
const figures = Array.from(document.querySelectorAll("#strip figure"));
const slider = document.getElementById("step");
function select(index) {
  figures.forEach((figure, i) => figure.classList.toggle("selected", i === index));
  document.getElementById("step-label").textContent = figures[index].dataset.label;
  figures[index].scrollIntoView({block: "nearest", inline: "center"});
}
if (slider) slider.addEventListener("input", () => select(Number(slider.value)));
window.addEventListener("load", () => {
  const grids = Array.from(document.querySelectorAll("img.grid"));
  document.body.dataset.grids = grids.length;
  document.body.dataset.gridsDecoded = grids.filter((img) => img.complete && img.naturalWidth > 0).length;
});
"""


def render(run: Run) -> str:
    """The page for `run`, as one HTML string."""
    title = f"sdtune report: {run.path.name}"
    made = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class='muted'>{_e(str(run.path.resolve()))} · written {_e(made)}</p>",
        _summary(run),
        "<h2>Sample grids</h2>",
        _grids(run),
        "<h2>Curves</h2>",
        _curves(run.scalars),
        "<h2>Validation loss</h2>",
        _validation(run.scalars.get("val/loss", [])),
        "<h2>Adapter and model files</h2>",
        _outputs(run.outputs),
        "<h2>config.yaml</h2>",
        f"<pre>{_e(run.config_text)}</pre>",
    ]
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}<script>{SCRIPT}</script></body></html>"
    )


def write_report(run: Run, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(run), encoding="utf-8")
    return out


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _summary(run: Run) -> str:
    loss = run.scalars.get("train/loss", [])
    parts = [f"{len(run.grids)} sample grid{'s' if len(run.grids) != 1 else ''}"]
    if loss:
        parts.insert(0, f"train/loss {_number(loss[-1][1])} at step {loss[-1][0]}")
    val = run.scalars.get("val/loss", [])
    if val:
        parts.insert(1, f"val/loss {_number(val[-1][1])} at step {val[-1][0]}")
    return f"<p>{_e(' · '.join(parts))}</p>"


# --- curves ----------------------------------------------------------------------------------------------------------


def _order(tag: str) -> tuple[int, str]:
    """train/loss first, then the other losses, the learning rates, then the rest (perf/*, samples/seconds)."""
    rank = 0 if tag == "train/loss" else 1 if "loss" in tag else 2 if tag.startswith("lr") else 3
    return rank, tag


def curve_tags(scalars: dict[str, list[tuple[int, float]]]) -> list[str]:
    """The scalars the page draws as curves, in the page's order (Lightning's `epoch` and `hp_metric` left out)."""
    return sorted((tag for tag in scalars if tag not in NOT_CURVES), key=_order)


def _curves(scalars: dict[str, list[tuple[int, float]]]) -> str:
    tags = curve_tags(scalars)
    if not scalars:
        return "<p class='missing'>No logs yet: logs/ holds no TensorBoard scalars.</p>"
    if not tags:
        return (f"<p class='missing'>No curves yet: logs/ holds only {_e(', '.join(sorted(scalars)))} (a loss is "
                "logged every trainer.log_every_n_steps steps).</p>")
    figures = [f"<figure><figcaption>{_e(tag)}</figcaption>{svg_curve(scalars[tag], tag)}</figure>" for tag in tags]
    return f"<div class='curves'>{''.join(figures)}</div>"


def _ticks(low: float, high: float) -> list[float]:
    return [low + (high - low) * i / (TICKS - 1) for i in range(TICKS)]


def svg_curve(points: list[tuple[int, float]], label: str) -> str:
    """`points` (step, value) as an SVG line chart with step and value axes; values that are not finite are left out
    of the line and counted under it."""
    finite = [(step, value) for step, value in points if math.isfinite(value)]
    if not finite:
        return f"<p class='missing'>{len(points)} values, none finite</p>"
    steps, values = [step for step, _ in finite], [value for _, value in finite]
    first, last, low, high = min(steps), max(steps), min(values), max(values)
    x0, x1 = first, last if last > first else first + 1
    pad = (high - low) * 0.05 or abs(low) * 0.05 or 1.0
    y0, y1 = low - pad, high + pad
    left, top = MARGIN["left"], MARGIN["top"]
    plot_w, plot_h = WIDTH - left - MARGIN["right"], HEIGHT - top - MARGIN["bottom"]

    def x(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * plot_w

    def y(value: float) -> float:
        return top + (y1 - value) / (y1 - y0) * plot_h

    parts = [f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='#fafafa' stroke='#ccc'/>"]
    for value in _ticks(low, high) if high > low else [low]:
        parts.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{y(value):.1f}' y2='{y(value):.1f}' stroke='#eee'/>")
        parts.append(f"<text x='{left - 6}' y='{y(value) + 4:.1f}' text-anchor='end'>{_number(value, high - low)}</text>")
    for step in sorted({round(s) for s in _ticks(first, last)}):
        parts.append(f"<text x='{x(step):.1f}' y='{HEIGHT - 8}' text-anchor='middle'>{step}</text>")
    if len(finite) == 1:
        parts.append(f"<circle cx='{x(steps[0]):.1f}' cy='{y(values[0]):.1f}' r='3' fill='#36c'/>")
    else:  # a long run's every point would only make the page heavy: at most MAX_POINTS, evenly spaced
        line = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in finite[:: math.ceil(len(finite) / MAX_POINTS)])
        parts.append(f"<polyline points='{line}' fill='none' stroke='#36c' stroke-width='1.5'/>")
    skipped = len(points) - len(finite)
    note = f"<p class='missing'>{skipped} values not finite (left out)</p>" if skipped else ""
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' role='img' "
        f"aria-label='{_e(label)} by step'><title>{_e(label)}: {len(finite)} points, steps {first} to {last}</title>"
        f"{''.join(parts)}</svg>{note}"
    )


def _number(value: float, span: float = 0.0) -> str:
    """`value` with 4 significant digits, or as many more as ticks `span` apart need to differ."""
    digits = 4
    if span > 0 and value != 0 and math.isfinite(value):
        digits = max(4, math.ceil(math.log10(abs(value) / span)) + 2)
    return f"{value:.{digits}g}"


# --- grids, validation, files ---------------------------------------------------------------------------------------


def _grids(run: Run) -> str:
    if not run.grids:
        return "<p class='missing'>No sample grids yet: samples/step_*/grid.png not found (samples run before training " \
               "and at every checkpoint when the config's samples: block is enabled).</p>"  # fmt: skip
    rows = "; ".join(f"{i + 1}. {prompt}" for i, prompt in enumerate(run.prompts))
    legend = f"<p class='muted'>Rows: {_e(rows)}. Columns: seeds {_e(', '.join(map(str, run.seeds)))}.</p>" if rows else ""
    figures, last = [], len(run.grids) - 1
    for i, grid in enumerate(run.grids):
        label = "step 0 (before training)" if grid.step == 0 else f"step {grid.step}"
        data = base64.b64encode(grid.png).decode("ascii")
        selected = " class='selected'" if i == last else ""
        figures.append(
            f"<figure{selected} data-label='{_e(label)}'><figcaption>{_e(label)}</figcaption>"
            f"<img class='grid' alt='sample grid at {_e(label)}' src='data:image/png;base64,{data}'></figure>"
        )
    slider = (
        f"<p><input type='range' id='step' min='0' max='{last}' value='{last}' aria-label='step'> "
        f"<span id='step-label'>step {run.grids[-1].step}</span></p>"
    )
    return f"{legend}{slider}<div id='strip'>{''.join(figures)}</div>"


def _validation(points: list[tuple[int, float]]) -> str:
    if not points:
        return "<p class='missing'>No validation loss logged: set data.val_fraction or data.val_root to hold out " \
               "images for val/loss.</p>"  # fmt: skip
    rows = "".join(f"<tr><td class='number'>{step}</td><td class='number'>{_number(value)}</td></tr>" for step, value in points)
    best = min(points, key=lambda point: point[1] if math.isfinite(point[1]) else math.inf)
    return (
        f"<p>Lowest: {_number(best[1])} at step {best[0]}.</p>"
        f"<table><tr><th>step</th><th>val/loss</th></tr>{rows}</table>"
    )


def _outputs(files: list[OutputFile]) -> str:
    if not files:
        return "<p class='missing'>No adapter/ or model/ written yet (they are written at the end of training, and " \
               "every adapter.every_n_train_steps).</p>"  # fmt: skip
    rows = []
    for file in files:
        readers = "<br>".join(f"{_e(tool)}: {_e(verdict)}" for tool, verdict in file.readers.items())
        rows.append(
            f"<tr><td><code>{_e(file.path)}</code></td><td class='number'>{human_size(file.size)}</td>"
            f"<td>{_e(file.check or '')}</td><td>{readers}</td></tr>"
        )
    return (
        "<p class='muted'>Each weights file as <code>sdtune inspect</code> reads it (format, model family) and the tools "
        "that load it.</p><table><tr><th>file</th><th>size</th><th>what it is</th><th>read by</th></tr>"
        f"{''.join(rows)}</table>"
    )

