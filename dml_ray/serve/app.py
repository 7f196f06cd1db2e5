"""The explorer's ASGI app: JSON endpoints over :class:`Explorer` and the page shipped in ``static/`` (no CDN).

No endpoint writes anything; image ids are looked up in the run's tables (``Explorer.check_id``), never used as
paths. With a ``token`` every request must carry it (``Authorization: Bearer <token>`` or ``?token=``).
"""
from __future__ import annotations

import hmac
from importlib import resources
from typing import Literal, Optional

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from dml_ray.errors import BadInput
from dml_ray.explore.projection import umap_available
from dml_ray.serve import explorer as limits
from dml_ray.serve.explorer import Explorer

STATIC = {"index.html": "text/html", "app.js": "text/javascript", "shared.css": "text/css"}
MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp", ".bmp": "image/bmp"}


def _static(name: str) -> str:
    return resources.files("dml_ray.serve").joinpath("static", name).read_text()


def create_app(explorer: Explorer, token: Optional[str] = None) -> FastAPI:
    """The app for one explorer; ``token`` (required beyond loopback) guards every route."""
    app = FastAPI(title="dml_ray explorer", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _guard(request: Request, call_next):  # noqa: ANN202 - Starlette's middleware signature
        if token is not None:
            given = request.query_params.get("token") or request.headers.get("authorization", "").removeprefix(
                "Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(KeyError)
    async def _unknown(request: Request, err: KeyError) -> JSONResponse:
        return JSONResponse({"detail": str(err).strip("'\"")}, status_code=404)

    @app.exception_handler(ValueError)  # BadInput included
    async def _bad(request: Request, err: ValueError) -> JSONResponse:
        status = 413 if isinstance(err, BadInput) and "exceeds" in str(err) else 400
        return JSONResponse({"detail": str(err)}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return _static("index.html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, "no such file")
        return Response(_static(name), media_type=STATIC[name])

    @app.get("/api/info")
    def info() -> dict:
        return {"run_id": explorer.run.run_id, "methods": explorer.methods, "image_size": explorer.image_size,
                "rows": len(explorer.ids), "splits": sorted(set(explorer.splits)),
                "labels": sorted({int(v) for v in explorer.labels}), "upload_device": explorer.embedder.device.type,
                "projections": ["pca", "umap"] if umap_available() else ["pca"]}

    @app.get("/api/gallery")
    def gallery(split: Optional[str] = None, label: Optional[int] = None, offset: int = Query(0, ge=0),
                limit: int = Query(100, ge=1, le=1000)) -> list:
        return explorer.gallery(split, label, offset, limit)

    @app.get("/api/image/{image_id:path}")
    def image(image_id: str) -> Response:
        data = explorer.image_bytes(image_id)
        uri = explorer.uris[image_id].lower()
        media = next((m for ext, m in MEDIA.items() if uri.endswith(ext)), "application/octet-stream")
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/view/{image_id:path}")
    def view(image_id: str) -> Response:
        return Response(explorer.input_view(image_id), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/topk")
    def topk(id: str, k: int = Query(10, ge=1, le=100)) -> list:  # noqa: A002 - the query parameter's name
        return explorer.topk(id, k)

    @app.get("/api/maps")
    def maps(query: str, ref: str) -> dict:
        arrays = explorer.pair_maps(query, ref)
        return {"cosine": float(arrays["cosine"]),
                "maps": {m: arrays[m].tolist() for m in explorer.methods}}

    @app.get("/api/point")
    def point(query: str, ref: str, row: float, col: float) -> dict:
        return {"map": explorer.point_map(query, ref, row, col).tolist()}

    @app.get("/api/region")
    def region(query: str, x: float, y: float, w: float = Query(..., gt=0), h: float = Query(..., gt=0),
               k: int = Query(10, ge=1, le=100)) -> list:
        return explorer.region_rerank(query, (x, y, w, h), k)

    @app.post("/api/upload")
    async def upload(request: Request, k: int = Query(10, ge=1, le=100)) -> dict:
        declared = int(request.headers.get("content-length") or 0)
        if declared > limits.MAX_UPLOAD_BYTES:
            raise BadInput(f"upload of {declared} bytes exceeds {limits.MAX_UPLOAD_BYTES}")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > limits.MAX_UPLOAD_BYTES:
                raise BadInput(f"upload exceeds {limits.MAX_UPLOAD_BYTES} bytes")
        hits, _, maps = explorer.upload_topk(data, k)
        return {"topk": hits, "maps": {ref: {m: v.tolist() for m, v in per.items()} for ref, per in maps.items()}}

    @app.get("/api/localization/options")
    def localization_options() -> dict:
        view = explorer.localization
        return {"available": view.available, "options": view.options() if view.available else []}

    @app.get("/api/localization")
    def localization(method: str, reference_kind: str, threshold: Optional[float] = None,
                     order: Literal["best", "worst"] = "worst", offset: int = Query(0, ge=0),
                     limit: int = Query(24, ge=1, le=500)) -> dict:
        return explorer.localization.rows(method, reference_kind, threshold, order, offset, limit)

    @app.get("/api/projection")
    def projection(method: str = "pca") -> dict:
        chosen, xy = explorer.projection(method)
        return {"method": chosen, "points": [{**explorer._row(i), "x": float(xy[i, 0]), "y": float(xy[i, 1])}
                                             for i in range(len(explorer.ids))]}

    return app
