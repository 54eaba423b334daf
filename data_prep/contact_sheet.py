"""The HTML contact sheet `sdtune prep check` writes: every image as a thumbnail with its caption, grouped by bucket.

One self-contained file (thumbnails are base64 JPEG data URIs), so it can be mailed or opened from any folder. All
text from the dataset (captions, file names) is HTML-escaped: captions are user data and may contain markup.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

from data_prep.dataset import Entry, bucket_order

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #ccc; }
nav a { margin-right: 1em; } .note { color: #a60; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 200px; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 6px; }
figure img { display: block; max-width: 192px; max-height: 192px; margin: 0 auto; }
figcaption { font-size: 0.85em; margin-top: 4px; overflow-wrap: anywhere; }
.meta { color: #666; font-size: 0.8em; } .empty { color: #c00; font-style: italic; }
.problem { color: #c00; }
"""


def _card(entry: Entry, thumbnail: str) -> str:
    name = html.escape(entry.file_name)
    caption = (
        f'<span class="caption">{html.escape(entry.text)}</span>'
        if entry.text
        else '<span class="empty">(no caption)</span>'
    )
    return (
        f'<figure><img src="data:image/jpeg;base64,{thumbnail}" alt="{name}" title="{name}" loading="lazy">'
        f'<figcaption>{caption}<div class="meta">{name} · {entry.width}x{entry.height} · bucket '
        f"{html.escape(entry.bucket or '?')}</div></figcaption></figure>"
    )


def render_contact_sheet(entries: list[Entry], thumbnails: dict[int, str], title: str, limit: int) -> str:
    """The page: a bucket index, one section per bucket (tall to wide) and a list of missing/unreadable files.

    Only entries with a thumbnail get a card; `limit` is named in a note when rows were left out.
    """
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        if entry.index in thumbnails and not entry.problem:
            groups[entry.bucket or "?"].append(entry)
    problems = [entry for entry in entries if entry.problem]
    readable = sum(1 for entry in entries if not entry.problem)
    shown = sum(len(group) for group in groups.values())
    order = sorted(groups, key=lambda b: bucket_order(b) if b != "?" else (float("inf"), b))

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>contact sheet: {html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{shown} of {readable} readable images, grouped by bucket (tall to wide).</p>",
    ]
    if shown < readable:
        parts.append(
            f'<p class="note">Showing the first {limit} rows of metadata.jsonl only; '
            "raise --sheet-limit to see more.</p>"
        )
    parts.append(
        "<nav>"
        + "".join(f'<a href="#bucket-{html.escape(b)}">{html.escape(b)} ({len(groups[b])})</a>' for b in order)
        + ("<a href=\"#problems\">problems</a>" if problems else "")
        + "</nav>"
    )
    for bucket in order:
        cards = "".join(_card(entry, thumbnails[entry.index]) for entry in groups[bucket])
        parts.append(
            f'<h2 id="bucket-{html.escape(bucket)}">bucket {html.escape(bucket)} · {len(groups[bucket])} images</h2>'
            f'<div class="grid">{cards}</div>'
        )
    if problems:
        items = "".join(
            f"<li>{html.escape(entry.file_name)}: {html.escape(entry.problem or '')}</li>" for entry in problems
        )
        parts.append(f'<h2 id="problems">missing or unreadable ({len(problems)})</h2><ul class="problem">{items}</ul>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_contact_sheet(
    path: str | Path, entries: list[Entry], thumbnails: dict[int, str], title: str, limit: int
) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_contact_sheet(entries, thumbnails, title, limit), encoding="utf-8")
    return path
