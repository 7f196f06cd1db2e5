"""A self-contained HTML page (figures inlined as base64 PNG) from titled sections."""
from __future__ import annotations

import base64
import datetime as dt
import html
from dataclasses import dataclass, field
from typing import Sequence

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; margin-bottom: 2em; }
section { margin-bottom: 2.5em; } table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
"""


@dataclass
class Section:
    """One titled part of a report: optional text, tables (header + rows) and PNG figures."""

    title: str
    anchor: str
    text: str = ""
    tables: list[tuple[Sequence[str], Sequence[Sequence[object]]]] = field(default_factory=list)
    figures: list[bytes] = field(default_factory=list)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("" if value is None else str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(title: str, sections: Sequence[Section], meta: str = "") -> str:
    """The whole page; every figure is embedded, so the file can be mailed or archived alone."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<div class='meta'>{html.escape(meta)} &middot; generated "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC</div>",
             "<nav><ul>" + "".join(f"<li><a href='#{s.anchor}'>{html.escape(s.title)}</a></li>" for s in sections)
             + "</ul></nav>"]
    for s in sections:
        parts.append(f"<section id='{html.escape(s.anchor)}'><h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        parts += [_table(h, rows) for h, rows in s.tables]
        parts += [f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                  for png in s.figures]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
