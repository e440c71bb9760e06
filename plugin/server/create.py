"""Ollama's routes that make models: /api/create (a Modelfile's settings over a model, or over a GGUF uploaded
to /api/blobs first, as `ollama create` sends it), /api/copy, and the blob uploads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..modelfile import REFUSED, ModelfileError, ModelSettings, check_messages, check_parameters, parse_modelfile
from ..registry import BlobWriter, ModelNotFound, Registry, RegistryError
from . import protocol as P
from .serving import ApiError

router = APIRouter()
UPLOAD_BATCH = 8 << 20  # bytes of an upload written (and hashed) per worker-thread call
GGUF_SUFFIX = ".gguf"


def _registry(request: Request) -> Registry:
    return request.app.state.dgemma.registry


def _blob(registry: Registry, digest: str) -> Path:
    try:
        return registry.blob_path(digest)
    except RegistryError as e:
        raise ApiError(400, str(e)) from None


@router.head("/api/blobs/{digest}")
async def blob_exists(request: Request, digest: str) -> Response:
    return Response(status_code=200 if _blob(_registry(request), digest).is_file() else 404)


@router.post("/api/blobs/{digest}")
async def blob_upload(request: Request, digest: str) -> Response:
    """The request body, kept where its sha256 is `digest` (400, and nothing kept, where it is not)."""
    registry = _registry(request)
    if _blob(registry, digest).is_file():
        return Response(status_code=200)
    writer: BlobWriter = await asyncio.to_thread(registry.blob_writer, digest)
    try:
        batch: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            batch.append(chunk)
            size += len(chunk)
            if size >= UPLOAD_BATCH:
                await asyncio.to_thread(writer.write, b"".join(batch))
                batch, size = [], 0
        await asyncio.to_thread(writer.write, b"".join(batch))
        await asyncio.to_thread(writer.finish)
    except RegistryError as e:
        raise ApiError(400, str(e)) from None
    except BaseException:  # the client went away, or anything else: no half upload stays
        writer.abort()
        raise
    return Response(status_code=201)


def _plan(registry: Registry, req: P.CreateRequest) -> tuple[str, ModelSettings, Path | None]:
    """What to build on (a model name, or an uploaded GGUF's blob), and the settings; 400s for the rest."""
    for field, value in (("adapters", req.adapters), ("template", req.template)):
        if value:
            raise ApiError(400, REFUSED["adapter" if field == "adapters" else "template"])
    try:
        if req.modelfile:  # (before Ollama 0.5: the Modelfile's text, FROM @sha256:... for an uploaded file)
            made = parse_modelfile(req.modelfile, "modelfile")
            base, settings = made.base, made.settings
            blob = _blob(registry, base[1:]) if base.startswith("@") else None
        else:
            base, blob = req.from_ or "", None
            license = [req.license] if isinstance(req.license, str) else list(req.license or [])
            settings = ModelSettings(req.system, check_parameters(req.parameters), check_messages(req.messages), license)
            if req.files:
                ggufs = [(f, d) for f, d in req.files.items() if f.endswith(GGUF_SUFFIX)]
                if len(ggufs) != 1 or len(req.files) != 1:
                    raise ApiError(400, f"files: expected one {GGUF_SUFFIX} file (safetensors: convert them with "
                                        f"'dgemma convert' first), got {', '.join(req.files) or 'none'}")
                if base:
                    raise ApiError(400, "give either 'from' (a model) or 'files' (an uploaded GGUF), not both")
                base, blob = ggufs[0][0], _blob(registry, ggufs[0][1])
    except ModelfileError as e:
        raise ApiError(400, str(e)) from None
    if blob is not None and not blob.is_file():
        raise ApiError(400, f"{base}: its blob was not uploaded (POST /api/blobs/sha256:<digest> first)")
    if not base:
        raise ApiError(400, "'from' (the model to build on) or 'files' (an uploaded GGUF) is required")
    if blob is None and (base.endswith(GGUF_SUFFIX) or "/" in base or "\\" in base):
        raise ApiError(400, f"from: '{base}' is a path; name a model, or upload the file to /api/blobs and name it "
                            "in 'files'")
    return base, settings, blob


@router.post("/api/create")
async def create(request: Request, req: P.CreateRequest) -> Response:
    name = req.model or req.name
    if not name:
        raise ApiError(400, "model is required")
    state = request.app.state.dgemma
    base, settings, blob = await asyncio.to_thread(_plan, state.registry, req)
    try:
        entry = await asyncio.to_thread(state.registry.create, name, base, settings, blob=blob, quantize=req.quantize)
    except ModelNotFound as e:
        raise ApiError(404, str(e)) from None
    except RegistryError as e:
        raise ApiError(400, str(e)) from None
    # a model loaded under this name before it was made again takes its new file at its next request (its
    # settings are read per request)
    if blob is not None and req.quantize:
        blob.unlink(missing_ok=True)  # (the upload was quantized into the model's own file)
    statuses = [f"using {'uploaded file' if blob is not None else 'model'} {base}"]
    statuses += [f"quantized to {req.quantize.upper()}"] if req.quantize else []
    statuses += [f"writing manifest for {P.display_name(entry.name)}", "success"]
    if req.stream is False:
        return JSONResponse({"status": statuses[-1]})

    async def lines():
        for status in statuses:
            yield (json.dumps({"status": status}) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/api/copy")
async def copy(request: Request, req: P.CopyRequest) -> Response:
    if not req.source or not req.destination:
        raise ApiError(400, "source and destination are required")
    state = request.app.state.dgemma
    try:
        await asyncio.to_thread(state.registry.copy, req.source, req.destination)
    except ModelNotFound:
        raise ApiError(404, f"model '{req.source}' not found") from None
    except RegistryError as e:
        raise ApiError(400, str(e)) from None
    return Response(status_code=200)  # (a model it replaces, loaded, takes the new one at its next request)
