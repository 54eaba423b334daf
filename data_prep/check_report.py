"""How `sdtune prep check` reports: issues (errors and warnings) as JSON objects, the report as a terminal table
and as a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def issue(code: str, message: str, files: list[str] | None = None) -> dict[str, Any]:
    """One error or warning of the report: a stable `code`, a one-line message, and every file it concerns."""
    return {"code": code, "message": message, "files": list(files or [])}


def format_table(report: dict[str, Any], listed: int = 10) -> str:
    """The report as plain text for the terminal (the JSON has every file name)."""
    c, s, t = report["counts"], report["settings"], report["tokens"]
    lines = [
        f"dataset   {report['dataset']}",
        f"images    {c['images']} readable of {c['rows']} rows ({c['missing']} missing, {c['unreadable']} unreadable"
        + (f", {c['outside']} outside the dataset)" if c.get("outside") else ")"),
        f"captions  {c['captioned']} captioned, {c['empty_captions']} empty, {c['duplicate_captions']} duplicated, "
        f"{c['long_captions']} over {s['max_tokens']} tokens",
        f"tokens    max {t['max']}, mean {t['mean']} ("
        + ("CLIP tokenizer" if t["counted_by"] == "tokenizer" else "estimated; pass --tokenizer for exact counts")
        + ")",
        "",
        "shorter side   images",
        *(f"  {label:<12}{n:>7}" for label, n in report["sizes"]["bins"].items()),
        "",
        f"bucket       images  batches  leftover   one batch = {s['global_batch']} "
        f"(batch {s['batch_size']} × devices {s['devices']} × accumulate {s['accumulate']})",
        *(
            f"  {b['bucket']:<11}{b['images']:>6}{b['batches']:>9}{b['leftover']:>10}"
            + ("" if b["ok"] else "   ERROR: fewer than one batch")
            for b in report["buckets"]
        ),
    ]
    if s["global_batch"] == 1:
        lines.append("  (pass --batch-size/--devices/--accumulate to check bucket fill against your batch)")
    for kind in ("errors", "warnings"):
        issues = report[kind]
        if issues:
            lines += ["", f"{kind} ({len(issues)}):"]
            lines += [f"  - {item['message']}" for item in issues[:listed]]
            if len(issues) > listed:
                lines.append(f"  ... {len(issues) - listed} more in the JSON report")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
