"""Every GGUF key, tensor name, token id and default that dgemma reads or writes, in one place.

Names follow llama.cpp's DiffusionGemma support (PR #24423, gguf-py `constants.py` there);
docs/FORMAT.md is the same table for people. Nothing elsewhere spells these strings.
"""

from __future__ import annotations

from enum import IntEnum

ARCH = "diffusion-gemma"
HF_ARCHITECTURES = ("DiffusionGemmaForBlockDiffusion", "DiffusionGemma4ModelForBlockDiffusion")

# ---- general.* -------------------------------------------------------------------------------
GENERAL_ARCHITECTURE = "general.architecture"
GENERAL_TYPE = "general.type"
GENERAL_NAME = "general.name"
GENERAL_FILE_TYPE = "general.file_type"
GENERAL_QUANTIZATION_VERSION = "general.quantization_version"
GENERAL_SIZE_LABEL = "general.size_label"
GGML_QUANT_VERSION = 2


# ---- {arch}.* hyperparameters ------------------------------------------------------------------
def arch_key(suffix: str) -> str:
    return f"{ARCH}.{suffix}"


BLOCK_COUNT = arch_key("block_count")
CONTEXT_LENGTH = arch_key("context_length")
EMBEDDING_LENGTH = arch_key("embedding_length")
FEED_FORWARD_LENGTH = arch_key("feed_forward_length")
HEAD_COUNT = arch_key("attention.head_count")
HEAD_COUNT_KV = arch_key("attention.head_count_kv")  # int32 array, one per layer
KEY_LENGTH = arch_key("attention.key_length")  # global (full-attention) head dim
VALUE_LENGTH = arch_key("attention.value_length")
KEY_LENGTH_SWA = arch_key("attention.key_length_swa")  # sliding-layer head dim
VALUE_LENGTH_SWA = arch_key("attention.value_length_swa")
SLIDING_WINDOW = arch_key("attention.sliding_window")
SLIDING_WINDOW_PATTERN = arch_key("attention.sliding_window_pattern")  # bool array, True = sliding layer
SHARED_KV_LAYERS = arch_key("attention.shared_kv_layers")
EMBEDDING_LENGTH_PER_LAYER_INPUT = arch_key("embedding_length_per_layer_input")
RMS_EPS = arch_key("attention.layer_norm_rms_epsilon")
CAUSAL = arch_key("attention.causal")
EXPERT_COUNT = arch_key("expert_count")
EXPERT_USED_COUNT = arch_key("expert_used_count")
EXPERT_FEED_FORWARD_LENGTH = arch_key("expert_feed_forward_length")
ROPE_FREQ_BASE = arch_key("rope.freq_base")
ROPE_FREQ_BASE_SWA = arch_key("rope.freq_base_swa")
ROPE_DIMENSION_COUNT = arch_key("rope.dimension_count")
ROPE_DIMENSION_COUNT_SWA = arch_key("rope.dimension_count_swa")
FINAL_LOGIT_SOFTCAPPING = arch_key("final_logit_softcapping")
DEFAULT_FINAL_LOGIT_SOFTCAPPING = 30.0  # DiffusionGemmaTextConfig's class default

# ---- diffusion.* (not arch-prefixed) -------------------------------------------------------------
CANVAS_LENGTH = "diffusion.canvas_length"
EB_MAX_STEPS = "diffusion.eb_max_steps"
EB_T_MIN = "diffusion.eb_t_min"
EB_T_MAX = "diffusion.eb_t_max"
EB_ENTROPY_BOUND = "diffusion.eb_entropy_bound"
EB_STABILITY_THRESHOLD = "diffusion.eb_stability_threshold"
EB_CONFIDENCE_THRESHOLD = "diffusion.eb_confidence_threshold"

# key -> (generation_config.json field, section or None, python type, reader default)
SAMPLER_KEYS: dict[str, tuple[str, str | None, type, float | int]] = {
    EB_MAX_STEPS: ("max_denoising_steps", None, int, 48),
    EB_T_MIN: ("t_min", None, float, 0.4),
    EB_T_MAX: ("t_max", None, float, 0.8),
    EB_ENTROPY_BOUND: ("entropy_bound", "sampler_config", float, 0.1),
    EB_STABILITY_THRESHOLD: ("stability_threshold", None, int, 1),
    EB_CONFIDENCE_THRESHOLD: ("confidence_threshold", None, float, 0.005),
}

# ---- dgemma-only layouts (llama.cpp cannot read these files) ------------------------------------------
# --pad-experts: expert down rows zero-padded from expert_feed_forward_length to this width
DGEMMA_EXPERT_DOWN_PADDED = "dgemma.expert_down_padded_length"
EXPERT_PAD_MULTIPLE = 256

# ---- tokenizer.* -------------------------------------------------------------------------------
TOKENIZER_MODEL = "tokenizer.ggml.model"
TOKENIZER_MODEL_NAME = "gemma4"
TOKENIZER_TOKENS = "tokenizer.ggml.tokens"
TOKENIZER_SCORES = "tokenizer.ggml.scores"
TOKENIZER_TOKEN_TYPE = "tokenizer.ggml.token_type"
TOKENIZER_MERGES = "tokenizer.ggml.merges"
TOKENIZER_ADD_BOS = "tokenizer.ggml.add_bos_token"
TOKENIZER_ADD_EOS = "tokenizer.ggml.add_eos_token"
TOKENIZER_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
TOKENIZER_CHAT_TEMPLATE = "tokenizer.chat_template"
# special-token role -> GGUF key ("seperator" is llama.cpp's spelling)
SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}
TOKEN_SCORE = -1000.0  # llama.cpp writes this score for every Gemma 4 token


class TokenType(IntEnum):
    """llama.cpp's token attribute codes (gguf.TokenType)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Gemma 4 tokens that llama.cpp keeps visible in the output (USER_DEFINED, not CONTROL)
VISIBLE_SPECIAL_TOKENS = frozenset(
    {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
)
# the structure of a Gemma 4 reply (plugin/reply.py): the thought channel, tool calls and their string quotes
CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
TOOL_CALL_START, TOOL_CALL_END = "<|tool_call>", "<tool_call|>"
TOOL_QUOTE = '<|"|>'
TURN_START = "<|turn>"
PAD_TOKEN_FORMAT = "[PAD{}]"  # fills the token list up to vocab_size when the tokenizer has fewer tokens

# ---- tensor names ---------------------------------------------------------------------------------
TOKEN_EMBD = "token_embd"
OUTPUT_NORM = "output_norm"
ROPE_FREQS = "rope_freqs"
SELF_COND_PRE_NORM = "self_cond_pre_norm"
SELF_COND_GATE = "self_cond_gate"
SELF_COND_UP = "self_cond_up"
SELF_COND_DOWN = "self_cond_down"
SELF_COND_NORM_ALT = "self_cond_norm"  # PR #24427's name for self_cond_pre_norm (accepted when reading)

# per-layer tensors: "blk.{bid}." + one of these
ATTN_NORM = "attn_norm"
ATTN_Q = "attn_q"
ATTN_K = "attn_k"
ATTN_V = "attn_v"
ATTN_OUTPUT = "attn_output"
ATTN_Q_NORM = "attn_q_norm"
ATTN_K_NORM = "attn_k_norm"
POST_ATTN_NORM = "post_attention_norm"
FFN_NORM = "ffn_norm"
POST_FFW_NORM = "post_ffw_norm"
PRE_FFW_NORM_2 = "pre_ffw_norm_2"
POST_FFW_NORM_1 = "post_ffw_norm_1"
POST_FFW_NORM_2 = "post_ffw_norm_2"
FFN_GATE = "ffn_gate"
FFN_UP = "ffn_up"
FFN_DOWN = "ffn_down"
FFN_GATE_INP = "ffn_gate_inp"
FFN_GATE_UP_EXPS = "ffn_gate_up_exps"
FFN_DOWN_EXPS = "ffn_down_exps"
LAYER_OUTPUT_SCALE = "layer_output_scale"
ENC_LAYER_OUTPUT_SCALE = "enc_layer_output_scale"

ROPE_FREQ_UNROTATED = 1e30  # rope_freqs factor that stops a dimension pair from rotating


def blk(bid: int, name: str, suffix: str = "weight") -> str:
    return f"blk.{bid}.{name}.{suffix}"


def gguf_name(name: str, suffix: str = "weight") -> str:
    return f"{name}.{suffix}"
