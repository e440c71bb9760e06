"""Tokenizer and chat template rebuilt from the GGUF alone, against the HF tokenizer of the fixture."""

from __future__ import annotations

import pytest
from gguf import GGUFReader

from dgemma.convert import convert
from dgemma.plugin.chat import render_chat
from dgemma.plugin.tokenizer import Tokenizer

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "runs     of     spaces",
    "new\nlines\n\n\nand\r\nwindows line ends\n",
    "\ttabs\tand\t\tmore tabs",
    "def add(a, b):\n    return a + b\n\n\nfor i in range(10):\n    print(i, add(i, i))\n",
    "if x > 0:\n\tprint('positive')\nelse:\n\tprint('negative')\n",
    "中文字符和日本語のテキスト",
    "emoji 🙂🚀 and accents: café, naïve, Zürich",
    "<|turn>user\nHi there<turn|>\n<|turn>model\n",
    "<bos>text with <eos> inside and <|channel>thought\n<channel|> too",
    "partial specials: <|turn <turn| <|tool_call",
    "numbers 3.14159, 2026, 1e-6; symbols # @ % & * ~ ^ | \\ / ` $",
    "",
    " ",
    "\n",
    "a" * 40 + " " + "ab" * 30,
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, base_checkpoint):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok") / "m.gguf"
    convert(base_checkpoint, path, "F16", quiet=True)
    return AutoTokenizer.from_pretrained(base_checkpoint), Tokenizer.from_gguf(GGUFReader(path))


@pytest.mark.parametrize("text", CORPUS)
def test_encode_and_decode_equal_hf(pair, text):
    hf, ours = pair
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)


def test_bos_is_added_only_when_asked(pair):
    hf, ours = pair
    assert ours.encode("hi", add_bos=True) == [hf.bos_token_id] + hf.encode("hi", add_special_tokens=False)
    assert hf.encode("hi") == hf.encode("hi", add_special_tokens=False)  # Gemma 4's post-processor adds nothing


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "system", "content": "  You are helpful.  "},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Write a haiku\nabout rain."},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen_prompt", [True, False])
@pytest.mark.parametrize("thinking", [None, True])
def test_chat_template_renders_as_hf(pair, messages, gen_prompt, thinking):
    hf, ours = pair
    kw = {} if thinking is None else {"enable_thinking": thinking}
    text = render_chat(ours, messages, add_generation_prompt=gen_prompt, **kw)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt, **kw)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt, **kw)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode(text) == list(ids)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 2, "units": {"metric": True, "x": None}}}}]},
    {"role": "tool", "name": "get_weather", "content": "18 C"},
    {"role": "assistant", "content": "It is 18 C."},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("upto", [2, 3, 4, 6])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_renders_tools_as_hf(pair, upto, gen_prompt):
    """Tool declarations, a reply's calls and the tool's answer, cut after each of them."""
    hf, ours = pair
    messages = TOOL_CONVERSATION[:upto]
    text = render_chat(ours, messages, add_generation_prompt=gen_prompt, tools=TOOLS)
    assert text == hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=gen_prompt)
    assert "<|tool>declaration:get_weather{" in text and (upto < 3 or '<|tool_call>call:get_weather{city:<|"|>Paris' in text)


@pytest.mark.parametrize("content", ["Once upon", "Once upon ", "  leading and trailing  \n", "two\nlines"])
@pytest.mark.parametrize("system", [False, True])
def test_a_final_assistant_message_continues_as_hf(pair, content, system):
    """continue_final: the text ends where the model's last message does, as transformers' continue_final_message
    renders it (the template trims the message, so its trailing spaces go too)."""
    from dgemma.plugin.chat import continues_final

    hf, ours = pair
    messages = ([{"role": "system", "content": "S"}] if system else []) + \
        [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": content}]
    assert continues_final(messages) and not continues_final(messages[:-1])
    text = render_chat(ours, messages, continue_final=True)
    assert text == hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("<|turn>model\n" + content.strip())
