"""Self-contained HTML pages rendered from the package's jinja2 templates (``dml_ray/report/templates``), with
autoescaping on: every string from a run (class names, image ids, metric names) is escaped. Figures and
thumbnails are inlined as base64 data URIs and the shared stylesheet (``dml_ray/serve/static/shared.css``, which
the explorer links) is inlined, so a page can be mailed or archived alone and opens offline."""
from __future__ import annotations

import base64
import datetime as dt
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Optional, Sequence

import jinja2
from markupsafe import Markup

SHARED_CSS = ("serve", "static", "shared.css")


@dataclass
class Tile:
    """One image of a retrieval grid: a JPEG thumbnail (None when the image could not be read), its caption, and
    for a retrieved image its score and whether its label is the query's."""

    image_id: str
    caption: str
    thumbnail: Optional[bytes]
    score: Optional[float] = None
    match: Optional[bool] = None


@dataclass
class GridRow:
    """A query and its retrieved images, nearest first; ``note`` says why the query is where it is."""

    query: Tile
    hits: list[Tile]
    note: str = ""


@dataclass
class Grid:
    """Titled rows of a retrieval grid; ``score_name`` labels the number under each retrieved image."""

    title: str
    rows: list[GridRow]
    score_name: str = "cosine"


@dataclass
class Section:
    """One titled part of a report: optional text, tables (header + rows), PNG figures and retrieval grids."""

    title: str
    anchor: str
    text: str = ""
    tables: list[tuple[Sequence[str], Sequence[Sequence[object]]]] = field(default_factory=list)
    figures: list[bytes] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)


def cell(value: object) -> str:
    """A table cell: integers as integers, other numbers with 4 decimals, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    """``data`` as a base64 ``data:`` URI."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def shared_css() -> Markup:
    """The stylesheet the report and the explorer share, marked safe for a ``<style>`` element: it is the
    package's own file, and one that could close the element is refused."""
    css = resources.files("dml_ray").joinpath(*SHARED_CSS).read_text()
    if "</" in css:
        raise ValueError(f"{'/'.join(SHARED_CSS)}: the stylesheet must not contain '</'")
    return Markup(css)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The jinja2 environment over the package's templates: autoescape on, undefined names are errors."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("dml_ray.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["cell"] = cell
    env.filters["data_uri"] = data_uri
    return env


def render_report(title: str, sections: Sequence[Section], meta: str = "") -> str:
    """The whole page (template ``report.html.j2``)."""
    return environment().get_template("report.html.j2").render(
        title=title, sections=sections, meta=meta, css=shared_css(),
        generated=f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
