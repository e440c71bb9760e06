"""Provider files: in sync with the renderer, parseable, and naming URLs and models a live server serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

try:
    import tomllib
except ImportError:  # (Python 3.10: pytest brings tomli)
    import tomli as tomllib
from server_util import running_server

from dgemma.plugin.default_model import ensure_default_model
from dgemma.plugin.manifests import render

ROOT = Path(__file__).resolve().parents[1]


def parse_env(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip("'\"")
    return out


def test_repository_manifests_are_the_default_rendering():
    for rel, text in render().items():
        assert (ROOT / "manifests" / rel).read_text() == text, rel


def endpoints(files: dict[str, str]) -> list[tuple[str, str, str]]:
    """(file, kind 'ollama'|'openai', base url, model) found in each rendered file."""
    found = []
    env = parse_env(files["open-webui.env"])
    found += [("open-webui", "ollama", env["OLLAMA_BASE_URL"], None), ("open-webui", "openai", env["OPENAI_API_BASE_URL"], None)]
    for m in yaml.safe_load(files["continue/config.yaml"])["models"]:
        assert m["provider"] == "ollama"
        found.append(("continue", "ollama", m["apiBase"], m["model"]))
    for entry in yaml.safe_load(files["litellm/config.yaml"])["model_list"]:
        p = entry["litellm_params"]
        provider, _, model = p["model"].partition("/")
        found.append(("litellm", "ollama" if provider == "ollama_chat" else "openai", p["api_base"], model))
    env = parse_env(files["anythingllm/.env"])
    assert env["LLM_PROVIDER"] == "ollama"
    found.append(("anythingllm", "ollama", env["OLLAMA_BASE_PATH"], env["OLLAMA_MODEL_PREF"]))
    jan = json.loads(files["jan/model.json"])
    assert jan["engine"] == "openai" and jan["format"] == "api"
    found.append(("jan", "openai", jan["sources"][0]["url"], jan["id"]))
    manifest = json.loads(files["lmstudio-plugin/manifest.json"])
    assert manifest["type"] == "plugin" and manifest["runner"] == "node"
    assert "@lmstudio/sdk" in json.loads(files["lmstudio-plugin/package.json"])["dependencies"]
    index = files["lmstudio-plugin/src/index.ts"]
    url = re.search(r'"(http[^"]+/v1)"', index).group(1)
    model = re.search(r'"model", "string", \{[^}]*\}, "([^"]+)"', index).group(1)
    found.append(("lmstudio", "openai", url, model))
    codex = tomllib.loads(files["codex/config.toml"])
    provider = codex["model_providers"][codex["model_provider"]]
    assert provider["wire_api"] == "responses"
    found.append(("codex", "openai", provider["base_url"], codex["model"]))
    return found


def test_every_file_points_at_a_url_and_model_the_server_serves(tmp_path):
    models = tmp_path / "models"
    ensure_default_model(models)
    shutil.copy(models / "default.gguf", models / "second.gguf")
    with running_server(models) as url:
        files = render(url, ["default:latest", "second:latest"])
        for name, kind, base, model in endpoints(files):
            if kind == "ollama":
                served = [m["name"] for m in httpx.get(f"{base}/api/tags", timeout=120).json()["models"]]
            else:
                served = [m["id"] for m in httpx.get(f"{base}/models", timeout=120).json()["data"]]
            assert served and (model is None or model in served), (name, base, model, served)
        # Continue names both models; the chat endpoint it will call answers
        r = httpx.post(f"{url}/api/chat", json={"model": "second:latest", "messages": [{"role": "user", "content": "hi"}],
                                               "stream": False, "options": {"num_predict": 4, "seed": 1}}, timeout=120)
        assert r.status_code == 200 and r.json()["done"]
        # Codex posts to base_url + /responses
        codex = tomllib.loads(files["codex/config.toml"])
        r = httpx.post(codex["model_providers"]["dgemma"]["base_url"] + "/responses", timeout=120,
                       json={"model": codex["model"], "input": "hi", "max_output_tokens": 2})
        assert r.status_code == 200 and r.json()["object"] == "response"


def test_lmstudio_plugin_type_checks(tmp_path):
    """The generator plugin compiles against the real @lmstudio/sdk (needs npm and the npm registry)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    plugin = tmp_path / "plugin"
    shutil.copytree(ROOT / "manifests" / "lmstudio-plugin", plugin)
    install = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "typescript@5", "@types/node"],
                             cwd=plugin, capture_output=True, text=True, timeout=300)
    if install.returncode != 0:
        pytest.skip(f"npm install failed (registry unreachable?): {install.stderr.strip()[-200:]}")
    tsc = subprocess.run(["npx", "tsc", "--noEmit", "--strict", "--target", "es2022", "--module", "nodenext",
                          "--moduleResolution", "nodenext", "--skipLibCheck", "--types", "node", "src/index.ts"],
                         cwd=plugin, capture_output=True, text=True, timeout=300)
    assert tsc.returncode == 0, tsc.stdout + tsc.stderr
