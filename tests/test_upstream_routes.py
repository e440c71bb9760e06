"""What dgemma does not do itself goes to an upstream Ollama (`--upstream`) for its models: embeddings (Open
WebUI's RAG pointed at dgemma, with an embedding model in Ollama), pull, delete; through the official ollama and
openai clients. No Ollama runs here: the upstream is a stand-in app speaking those routes as Ollama's docs/api.md
gives them (its embeddings are made up); what is tested is dgemma's routing, proxying and errors."""

from __future__ import annotations

import json

import ollama
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from server_util import free_port, serving

from dgemma.plugin.default_model import ensure_default_model
from dgemma.plugin.server.app import ServerConfig, create_app

EMBEDDER = "nomic-embed-text:latest"


def upstream_app(seen: list[tuple[str, str, dict]]) -> FastAPI:
    from starlette.middleware.gzip import GZipMiddleware

    app = FastAPI()
    app.add_middleware(GZipMiddleware, minimum_size=1)  # (as nginx in front of an upstream may: dgemma decodes)
    models = {EMBEDDER}

    async def note(request: Request) -> dict:
        body = json.loads(await request.body() or b"{}")
        seen.append((request.method, request.url.path, body))
        return body

    @app.get("/api/tags")
    async def tags() -> dict:
        return {"models": [{"name": m, "model": m, "size": 1, "digest": "0" * 64, "modified_at":
                            "2026-01-01T00:00:00Z", "details": {}} for m in sorted(models)]}

    @app.get("/v1/models")
    async def v1_models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "library"}
                                           for m in sorted(models)]}

    @app.post("/api/embed")
    async def embed(request: Request) -> dict:
        body = await note(request)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return {"model": body["model"], "embeddings": [[len(t), 0.5, -1.0] for t in texts]}

    @app.post("/v1/embeddings")
    async def v1_embed(request: Request) -> dict:
        body = await note(request)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1},
                "data": [{"object": "embedding", "index": i, "embedding": [float(len(t)), 0.5]}
                         for i, t in enumerate(texts)]}

    @app.post("/api/pull")
    async def pull(request: Request) -> StreamingResponse:
        body = await note(request)
        models.add(body["model"] if ":" in body["model"] else body["model"] + ":latest")
        lines = [{"status": "pulling manifest"}, {"status": "success"}]
        return StreamingResponse((json.dumps(x) + "\n" for x in lines), media_type="application/x-ndjson")

    @app.delete("/api/delete")
    async def delete(request: Request) -> JSONResponse:
        body = await note(request)
        name = body["model"] if ":" in body["model"] else body["model"] + ":latest"
        if name not in models:
            return JSONResponse({"error": f"model '{body['model']}' not found"}, status_code=404)
        models.discard(name)
        return JSONResponse({})

    return app


@pytest.fixture
def front(tmp_path):
    seen: list[tuple[str, str, dict]] = []
    ensure_default_model(tmp_path / "models")
    with serving(upstream_app(seen)) as upstream:
        app = create_app(ServerConfig(models=tmp_path / "models", upstream=upstream, upstream_openai=f"{upstream}/v1"))
        with serving(app) as url:
            yield url, seen


def test_an_upstream_embedding_model_embeds_through_dgemma(front):
    url, seen = front
    client = ollama.Client(host=url)
    out = client.embed(model="nomic-embed-text", input=["one", "three"])
    assert out.embeddings == [[3.0, 0.5, -1.0], [5.0, 0.5, -1.0]]
    assert seen[-1] == ("POST", "/api/embed", {"model": "nomic-embed-text", "input": ["one", "three"]})
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    got = oa.embeddings.create(model=EMBEDDER, input=["four"])
    assert got.data[0].embedding == [4.0, 0.5] and seen[-1][1] == "/v1/embeddings"
    # DiffusionGemma's own models have none; an unknown model is not found
    with pytest.raises(ollama.ResponseError, match="generative model") as e:
        client.embed(model="default", input="x")
    assert e.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="nowhere", input="x")
    assert e.value.status_code == 404 and "not found" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="generative model"):
        oa.embeddings.create(model="default", input="x")
    with pytest.raises(openai.NotFoundError):
        oa.embeddings.create(model="nowhere", input="x")
    assert len(seen) == 2  # (none of these reached the upstream)


def test_pull_and_delete_of_upstream_models_go_upstream(front):
    url, seen = front
    client = ollama.Client(host=url)
    assert [p.status for p in client.pull("all-minilm", stream=True)] == ["pulling manifest", "success"]
    assert "all-minilm:latest" in [m.model for m in client.list().models]
    assert client.delete("all-minilm").status == "success"
    assert seen[-1] == ("DELETE", "/api/delete", {"model": "all-minilm"})
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("all-minilm")  # (gone upstream too: not ours, not theirs)
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="does not download") as e:
        client.pull("default")  # ours: not pulled over
    assert e.value.status_code == 501


def test_an_openai_upstream_alone_a_loop_back_and_a_dead_upstream(tmp_path):
    """An OpenAI-only upstream gets its models' requests also by their untagged names; an --upstream that is
    this server itself lists nothing and answers 508 instead of calling itself without end; an upstream that
    does not answer is a 502 naming it; a model name too long for a file name is a 404."""
    seen: list[tuple[str, str, dict]] = []
    ensure_default_model(tmp_path / "models")
    with serving(upstream_app(seen)) as upstream:
        app = create_app(ServerConfig(models=tmp_path / "models", upstream_openai=f"{upstream}/v1"))
        with serving(app) as url:
            oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
            assert oa.embeddings.create(model="nomic-embed-text", input="ab").data[0].embedding == [2.0, 0.5]
    port = free_port()
    me = f"http://127.0.0.1:{port}"
    with serving(create_app(ServerConfig(models=tmp_path / "models", upstream=me)), port=port) as url:
        client = ollama.Client(host=url, timeout=30)
        assert [m.model for m in client.list().models] == ["default:latest"]
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("zzz")
        assert e.value.status_code == 508 and "leads back to this server" in str(e.value)
    dead = f"http://127.0.0.1:{free_port()}"
    with serving(create_app(ServerConfig(models=tmp_path / "models", upstream=dead))) as url:
        client = ollama.Client(host=url, timeout=30)
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("zzz")
        assert e.value.status_code == 502 and dead in str(e.value)
        with pytest.raises(ollama.ResponseError) as e:
            client.embed(model="x" * 300, input="y")
        assert e.value.status_code == 404
