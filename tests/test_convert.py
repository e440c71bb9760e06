"""HF checkpoint -> GGUF: names, metadata, values and determinism, checked with gguf-py as the reader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from safetensors.torch import load_file

from dgemma.convert import constants as C
from dgemma.convert import convert

TYPES = ["F32", "F16", "BF16", "Q8_0"]
QTYPE = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0}
# Names llama.cpp's DiffusionGemma converter gives the tensors that gguf-py's Gemma 4 map does not know
# (../shared/gguf-names.md, read from PR #24423).
DIFFUSION_ONLY = {
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
}
SELF_COND = {
    "model.decoder.self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    "model.decoder.self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    "model.decoder.self_conditioning.up_proj.weight": "self_cond_up.weight",
    "model.decoder.self_conditioning.down_proj.weight": "self_cond_down.weight",
}


def hf_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def expected_gguf_name(hf: str, n_layer: int) -> str | None:
    """The oracle mapping: gguf-py's Gemma 4 TensorNameMap plus the PR's DiffusionGemma additions."""
    if "vision" in hf:
        return None
    if hf in SELF_COND:
        return SELF_COND[hf]
    if hf.startswith("model.encoder."):
        if hf.endswith("layer_scalar"):
            return f"blk.{hf.split('.')[-2]}.enc_layer_output_scale.weight"
        return None
    parts = hf.split(".")
    if len(parts) > 4 and ".".join(parts[4:]) in DIFFUSION_ONLY:
        return f"blk.{parts[3]}.{DIFFUSION_ONLY['.'.join(parts[4:])]}"
    name = hf.replace("model.decoder.", "model.")
    if name.endswith("layer_scalar") or ".experts." in name:
        name += ".weight"
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n_layer).get_name(name, try_suffixes=(".weight",))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoint_factory):
    """(spec name, type) -> GGUF path, converted once per module."""
    from conftest import SPECS

    out = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(spec_name: str, type_name: str) -> Path:
        if (spec_name, type_name) not in cache:
            ckpt = checkpoint_factory(SPECS[spec_name])
            path = out / f"{spec_name}-{type_name}.gguf"
            convert(ckpt, path, type_name, quiet=True)
            cache[spec_name, type_name] = path
        return cache[spec_name, type_name]

    return get


def reference_bytes(values: torch.Tensor, qtype: Q) -> np.ndarray:
    """What the stored bytes must be: torch's cast for float types, gguf-py's quantizer for Q8_0."""
    if qtype == Q.F32:
        return values.float().numpy().view(np.uint8)
    if qtype == Q.F16:
        return values.to(torch.float16).numpy().view(np.uint8)
    if qtype == Q.BF16:
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return np.ascontiguousarray(gguf.quants.quantize(values.float().numpy(), qtype)).view(np.uint8)


@pytest.mark.parametrize("type_name", TYPES)
def test_every_tensor_round_trips(any_checkpoint, converted, type_name):
    spec_name, spec, ckpt = any_checkpoint
    reader = GGUFReader(converted(spec_name, type_name))
    stored = {t.name: t for t in reader.tensors}
    source = hf_tensors(ckpt)
    assert any("vision" in k for k in source), "fixture should carry a vision tower for the converter to skip"

    expected_names = {}
    for hf, value in source.items():
        name = expected_gguf_name(hf, spec.num_hidden_layers)
        if name is not None:
            expected_names[name] = value
    assert set(stored) == set(expected_names) | {"rope_freqs.weight"}

    for name, value in expected_names.items():
        t = stored[name]
        assert tuple(int(x) for x in reversed(t.shape)) == tuple(value.shape), name
        forced_f32 = value.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
            or name.endswith("ffn_gate_inp.weight")
        want = Q.F32 if forced_f32 else QTYPE[type_name]
        if want == Q.Q8_0 and value.shape[-1] % 32:
            want = Q.F16  # llama.cpp's fallback for rows that do not fill whole blocks
        assert t.tensor_type == want, name
        got = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(got, reference_bytes(value, want).reshape(-1), err_msg=name)
        if want == Q.F32:  # F32 exact, and no "+1" or other change on norms and scalars
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(value.shape),
                                          value.float().numpy(), err_msg=name)


def test_rope_freqs_follow_partial_rotary_factor(converted):
    reader = GGUFReader(converted("bf16_wide", "BF16"))
    (t,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    values = np.asarray(t.data)
    assert values.shape == (32,)  # global_head_dim 64 / 2
    assert (values[:8] == 1.0).all() and (values[8:] == np.float32(1e30)).all()  # 0.25 * 64 / 2 = 8 rotated


def _fields(path: Path) -> dict:
    reader = GGUFReader(path)
    out = {}
    for key, f in reader.fields.items():
        value = f.contents()
        out[key] = list(value) if isinstance(value, list) else value
    return out


def test_metadata_matches_config_and_generation_config(any_checkpoint, converted):
    spec_name, spec, ckpt = any_checkpoint
    f = _fields(converted(spec_name, "Q8_0"))
    gen = json.loads((ckpt / "generation_config.json").read_text())
    swa = [t == "sliding_attention" for t in spec.layer_types]
    assert f["general.architecture"] == "diffusion-gemma"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["general.quantization_version"] == 2
    a = "diffusion-gemma."
    assert f[a + "block_count"] == spec.num_hidden_layers
    assert f[a + "embedding_length"] == spec.hidden_size
    assert f[a + "feed_forward_length"] == spec.intermediate_size
    assert f[a + "attention.head_count"] == spec.num_attention_heads
    assert f[a + "attention.head_count_kv"] == [
        spec.num_key_value_heads if s else spec.num_global_key_value_heads for s in swa
    ]
    assert f[a + "attention.sliding_window_pattern"] == swa
    assert f[a + "attention.sliding_window"] == spec.sliding_window
    assert f[a + "attention.key_length"] == f[a + "attention.value_length"] == spec.global_head_dim
    assert f[a + "attention.key_length_swa"] == f[a + "attention.value_length_swa"] == spec.head_dim
    assert f[a + "rope.dimension_count"] == spec.global_head_dim
    assert f[a + "rope.dimension_count_swa"] == spec.head_dim
    assert f[a + "rope.freq_base"] == 1e6 and f[a + "rope.freq_base_swa"] == 1e4
    assert f[a + "expert_count"] == spec.num_experts
    assert f[a + "expert_used_count"] == spec.top_k_experts
    assert f[a + "expert_feed_forward_length"] == spec.moe_intermediate_size
    assert f[a + "final_logit_softcapping"] == 30.0
    assert f[a + "attention.causal"] is False
    assert f[a + "context_length"] == spec.max_position_embeddings
    assert f["diffusion.canvas_length"] == spec.canvas_length
    assert f["diffusion.eb_max_steps"] == gen["max_denoising_steps"]
    assert f["diffusion.eb_stability_threshold"] == gen["stability_threshold"]
    for key, field in [("eb_t_min", "t_min"), ("eb_t_max", "t_max"), ("eb_confidence_threshold", "confidence_threshold")]:
        assert f["diffusion." + key] == pytest.approx(gen[field], rel=1e-6)
    assert f["diffusion.eb_entropy_bound"] == pytest.approx(gen["sampler_config"]["entropy_bound"], rel=1e-6)


def test_tokenizer_keys_match_the_hf_tokenizer(base_checkpoint, converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_checkpoint)
    f = _fields(converted("base", "F16"))
    tokens = f["tokenizer.ggml.tokens"]
    vocab = tok.get_vocab()
    assert len(tokens) == len(vocab) == 512
    assert all(vocab[t] == i for i, t in enumerate(tokens))
    types = f["tokenizer.ggml.token_type"]
    assert types[tokens.index("<0x41>")] == C.TokenType.BYTE
    assert types[tok.convert_tokens_to_ids("<|turn>")] == C.TokenType.CONTROL
    assert types[tok.convert_tokens_to_ids("<bos>")] == C.TokenType.CONTROL
    for visible in C.VISIBLE_SPECIAL_TOKENS:
        assert types[tok.convert_tokens_to_ids(visible)] == C.TokenType.USER_DEFINED
    assert sum(t == C.TokenType.NORMAL for t in types) == 512 - 256 - len(tok.all_special_ids)
    assert set(f["tokenizer.ggml.scores"]) == {-1000.0}
    merges = json.loads((base_checkpoint / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert f["tokenizer.ggml.model"] == "gemma4" and "tokenizer.ggml.pre" not in f
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert f["tokenizer.ggml.unknown_token_id"] == tok.unk_token_id
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"] is False
    assert f["tokenizer.chat_template"] == (base_checkpoint / "chat_template.jinja").read_text()


def test_token_list_is_padded_to_vocab_size(tmp_path, base_checkpoint):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_checkpoint, ckpt)
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    # drop the last 7 tokens (the multimodal ones) from the tokenizer, keep the 512-row embedding
    drop = {t for t, i in tj["model"]["vocab"].items() if i >= 505}
    tj["model"]["vocab"] = {t: i for t, i in tj["model"]["vocab"].items() if t not in drop}
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] not in drop]
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    for key in [k for k, v in cfg.items() if isinstance(v, str) and v in drop]:
        del cfg[key]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    convert(ckpt, tmp_path / "out.gguf", "F16", quiet=True)
    f = _fields(tmp_path / "out.gguf")
    assert f["tokenizer.ggml.tokens"][505:] == [f"[PAD{i}]" for i in range(505, 512)]
    assert f["tokenizer.ggml.token_type"][505:] == [C.TokenType.UNUSED] * 7


def test_converting_twice_gives_identical_bytes(tmp_path, checkpoint_factory):
    from conftest import SPECS

    ckpt = checkpoint_factory(SPECS["bf16_wide"])
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        convert(ckpt, p, "Q8_0", quiet=True)
    assert a.read_bytes() == b.read_bytes()


def test_weight_fixups_run_exactly_once_per_tensor(tmp_path, base_checkpoint, monkeypatch):
    calls: dict[str, int] = {}
    from dgemma.convert.arch import DiffusionGemma

    real = DiffusionGemma.modify_tensors

    def counting(self, name, data):
        if data.device.type != "meta":
            calls[name] = calls.get(name, 0) + 1
        return real(self, name, data)

    monkeypatch.setattr(DiffusionGemma, "modify_tensors", counting)
    convert(base_checkpoint, tmp_path / "m.gguf", "F32", quiet=True)
    n_tensors = len(GGUFReader(tmp_path / "m.gguf").tensors)
    assert len(calls) == n_tensors and set(calls.values()) == {1}


def test_output_refused_without_force_and_replaced_with_it(tmp_path, base_checkpoint):
    from dgemma.convert import ConvertError

    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="already exists"):
        convert(base_checkpoint, out, "F16", quiet=True)
    assert out.read_bytes() == b"keep me"
    convert(base_checkpoint, out, "F16", force=True, quiet=True)
    assert GGUFReader(out).fields["general.architecture"].contents() == "diffusion-gemma"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
