"""A Gemma 4 reply's parts (plugin/reply.py) from real token ids of the tiny tokenizer: the thought channel, the
answer and tool calls, however the tokens fall into canvases; calls read back as the chat template writes them."""

from __future__ import annotations

import random

import pytest
from gguf import GGUFReader

from dgemma.convert import convert
from dgemma.plugin.chat import render_chat, template_features
from dgemma.plugin.engine import Engine, GenerateOptions, TextEvent
from dgemma.plugin.reply import TextAssembler
from dgemma.plugin.reply import MAX_DEPTH, ReplyDelta, ReplyParser, ToolCall, ToolCallError, parse_call
from dgemma.plugin.tokenizer import Tokenizer

Q = '<|"|>'
REPLY = ("<|channel>thought\nThe user wants the weather: é 🙂, so call it.<channel|>Let me look."
         f"<|tool_call>call:get_weather{{city:{Q}Paris, France{Q},days:3}}<tool_call|>"
         f"<|tool_call>call:get_time{{zone:{Q}CET{Q}}}<tool_call|>")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, base_checkpoint):
    path = tmp_path_factory.mktemp("reply") / "tiny.gguf"
    convert(base_checkpoint, path, "F16", quiet=True)
    return path


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFReader(gguf_path))


def parse(tok: Tokenizer, pieces: list[list[int]], **kw) -> ReplyDelta:
    p, out = ReplyParser(tok, **kw), ReplyDelta()
    for k, ids in enumerate(pieces):
        out.extend(p.feed(ids, final=k == len(pieces) - 1))
    return out


def test_parse_call_reads_every_kind_of_value():
    text = (f"call:f{{s:{Q}a, b}} [c]: d{Q},n:-12,x:2.5e-3,t:true,u:false,z:null,w:word,"
            f"l:[1,{Q}two{Q},[],{{}}],o:{{k:{{deep:[true]}},{Q}quoted key{Q}:0}}}}")
    call = parse_call(text)
    assert call == ToolCall("f", {"s": "a, b} [c]: d", "n": -12, "x": 2.5e-3, "t": True, "u": False, "z": None,
                                  "w": "word", "l": [1, "two", [], {}], "o": {"k": {"deep": [True]}, "quoted key": 0}})
    assert parse_call(" call: my.tool-1 { } ") == ToolCall("my.tool-1", {})
    assert parse_call(f"call:f{{ a : {Q} spaced {Q} , b : [ 1 , 2 ] }}").arguments == {"a": " spaced ", "b": [1, 2]}


@pytest.mark.parametrize("text", [
    "f{a:1}", "call:{a:1}", "call:two words{a:1}", "call:f(a=1)", f"call:f{{a:{Q}open}}", "call:f{a:1} more",
    "call:f{a:1", "call:f{a 1}", "call:f{a:1 b:2}", "call:f{:1}", "call:f{a:}", "call:f{a:[1,2}",
    "call:f{a:" + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "}",
])
def test_parse_call_refuses_what_it_cannot_read(text):
    with pytest.raises(ToolCallError, match="tool call"):
        parse_call(text)


ARGUMENTS = [
    {},
    {"city": "Paris, France", "days": 3},
    {"query": 'a "quoted" {brace} [bracket], colon: yes', "limit": -1, "ratio": 0.25, "strict": False, "cursor": None},
    {"filters": {"tags": ["a", "b c"], "range": {"from": 1, "to": 2.5}}, "nested": [[1, [2]], {"x": True}]},
    {"text": "line one\nline two\ttab é 🙂"},
]


@pytest.mark.parametrize("arguments", ARGUMENTS)
def test_calls_read_back_as_the_template_writes_them(tok, arguments):
    """The tiny template writes an earlier reply's call as Gemma 4's format_argument does; reading the rendered
    call's tokens gives the same name and arguments."""
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                      "function": {"name": "search", "arguments": arguments}}]}]
    text = render_chat(tok, messages, add_generation_prompt=False)
    call = text[text.index("<|tool_call>"):text.index("<tool_call|>") + len("<tool_call|>")]
    assert parse(tok, [tok.encode(call)], tools=True) == ReplyDelta(tool_calls=[ToolCall("search", arguments)])


def test_any_split_into_canvases_gives_the_same_parts(tok):
    ids = tok.encode(REPLY)
    assert len(ids) > 30 and any(i in tok.byte_ids.values() for i in ids)  # é and 🙂 as byte tokens
    want = ReplyDelta("Let me look.", "The user wants the weather: é 🙂, so call it.",
                      [ToolCall("get_weather", {"city": "Paris, France", "days": 3}), ToolCall("get_time", {"zone": "CET"})])
    for cut in range(len(ids) + 1):
        assert parse(tok, [ids[:cut], ids[cut:]], thinking=True, tools=True) == want, cut
    rng = random.Random(0)
    for _ in range(50):
        a, b = sorted(rng.sample(range(len(ids) + 1), 2))
        assert parse(tok, [ids[:a], ids[a:b], ids[b:]], thinking=True, tools=True) == want
    assert parse(tok, [[i] for i in ids], thinking=True, tools=True) == want


def test_without_the_parts_asked_for_it_is_the_plain_decoder(tok):
    """thinking and tools off: the text HF's skip_special_tokens decoding gives, markers dropped, call text kept;
    thinking alone: the channel split off, a call's text left in the answer."""
    ids = tok.encode(REPLY)
    assert parse(tok, [ids[:17], ids[17:]]) == ReplyDelta(tok.decode(ids, skip_special=True))
    only = parse(tok, [ids], thinking=True)
    assert only.thinking.startswith("The user") and not only.tool_calls
    assert only.content == "Let me look.call:get_weather{city:Paris, France,days:3}call:get_time{zone:CET}"
    rng = random.Random(1)
    for _ in range(20):  # any ids, special ones included
        ids = [rng.randrange(len(tok.tokens)) for _ in range(rng.randrange(1, 60))]
        cut = rng.randrange(len(ids) + 1)
        assert parse(tok, [ids[:cut], ids[cut:]]).content == tok.decode(ids, skip_special=True)


def test_a_call_it_cannot_read_stays_in_the_answer(tok):
    bad = f"Sure.<|tool_call>call:f{{a:{Q}open}}<tool_call|> Done."
    out = parse(tok, [tok.encode(bad)], thinking=True, tools=True)
    assert out == ReplyDelta(bad)
    # cut before its end marker (max_tokens, or the end of the generation): read if it is whole
    whole = parse(tok, [tok.encode("<|tool_call>call:f{a:1}")], tools=True)
    assert whole == ReplyDelta(tool_calls=[ToolCall("f", {"a": 1})])
    half = parse(tok, [tok.encode(f"Hi <|tool_call>call:f{{a:{Q}x")], tools=True)
    assert half == ReplyDelta(f"Hi <|tool_call>call:f{{a:{Q}x")  # as the model wrote it: no end marker added
    # numbers no int or float holds stay the words they are (json.loads would raise, or give inf)
    big = parse_call("call:f{a:" + "1" * 5000 + ",b:1e999,c:-1e999,d:1e308}").arguments
    assert big == {"a": "1" * 5000, "b": "1e999", "c": "-1e999", "d": 1e308}


def test_a_call_inside_the_thought_channel(tok):
    """A call the model writes while thinking is read, and its thinking goes on after it; one it cannot read
    stays in the thinking."""
    text = "<|channel>thought\nhmm <|tool_call>call:f{a:1}<tool_call|> more<channel|>answer"
    assert parse(tok, [tok.encode(text)], thinking=True, tools=True) == \
        ReplyDelta("answer", "hmm  more", [ToolCall("f", {"a": 1})])
    text = "<|channel>thought\nhmm <|tool_call>call:f{a<tool_call|> more<channel|>answer"
    assert parse(tok, [tok.encode(text)], thinking=True, tools=True) == \
        ReplyDelta("answer", "hmm <|tool_call>call:f{a<tool_call|> more")
    # the generation ends (max_tokens) in the channel's name: its text is kept, as thinking
    assert parse(tok, [tok.encode("<|channel>thou")], thinking=True) == ReplyDelta(thinking="thou")


def test_the_prompt_says_where_the_reply_starts(tok):
    """A generation prompt that opens the thought channel (thinking on, in Gemma 4's templates that write it)
    starts the reply in it; after the empty channel, or after tool responses, in the answer."""
    open_channel = tok.encode("<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n")
    p = ReplyParser(tok, thinking=True, tools=True)
    p.prime(open_channel)
    assert p.feed(tok.encode("plan<channel|>answer"), final=True) == ReplyDelta("answer", "plan")
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": {"c": "x"}}}]},
                {"role": "tool", "name": "w", "content": "18 C"}]
    for prompt in (render_chat(tok, messages[:1]), render_chat(tok, messages)):
        p = ReplyParser(tok, thinking=True, tools=True)
        p.prime(tok.encode(prompt))
        assert p.feed(tok.encode("It is 18 C."), final=True) == ReplyDelta("It is 18 C.")
    assert render_chat(tok, messages).endswith("<tool_response|>")  # the model's turn goes on


def test_stop_strings_cut_the_answer_only(tok):
    ids = tok.encode("<|channel>thought\nsay END here<channel|>first END second")
    text = TextAssembler(ReplyParser(tok, thinking=True), ["END"])
    parts = [text.add(ids[:9], final=False), text.add(ids[9:], final=True)]
    assert "".join(p.thinking for p, _ in parts) == "say END here"
    assert "".join(p.content for p, _ in parts) == "first " and parts[-1][1]
    # a call before the stop string stays, one after it goes with the answer's rest
    ids = tok.encode("a<|tool_call>call:f{x:1}<tool_call|>b END c<|tool_call>call:g{}<tool_call|>")
    for cut in (0, 3, len(ids)):
        text = TextAssembler(ReplyParser(tok, tools=True), ["END"])
        first, stopped = text.add(ids[:cut], final=False)
        if not stopped:  # (the engine stops adding at the first stop)
            first.extend(text.add(ids[cut:], final=True)[0])
        assert first == ReplyDelta("ab ", "", [ToolCall("f", {"x": 1})]), cut


def test_template_features(tok, default_gguf):
    """Found by rendering, with the special tokens' variables a template may use."""
    from dataclasses import replace

    assert template_features(tok).tools and template_features(tok).thinking
    default = Tokenizer.from_gguf(GGUFReader(default_gguf))
    assert not template_features(default).tools and template_features(default).thinking
    for source, tools, thinking in [
        (None, False, False),
        ("{{ raise_exception('no') }}", False, False),
        ("{{ bos_token + (tools | tojson if tools else '') }}{{ 'T' if enable_thinking }}", True, True),
    ]:
        features = template_features(replace(tok, chat_template=source))
        assert (features.tools, features.thinking) == (tools, thinking), source


def test_the_engine_splits_its_canvases(gguf_path, tok):
    """A generation on the tiny model (canvas 16, several canvases): with the parts asked for, the events' answer,
    thinking and calls are what the parser makes of all its tokens at once; without, the text is as before."""
    engine = Engine.load(gguf_path)
    messages = [{"role": "user", "content": "Hello"}]
    for split in (False, True):
        o = GenerateOptions(seed=3, max_tokens=64, split_thinking=split, tool_calls=split)
        events = list(engine.generate(messages, o, enable_thinking=True))
        done, texts = events[-1], [e for e in events if isinstance(e, TextEvent)]
        assert len(texts) >= 2
        got = ReplyDelta()
        for e in texts:
            got.extend(e.reply)
        p = ReplyParser(tok, thinking=split, tools=split)
        p.prime(engine.prompt_ids(messages, enable_thinking=True))
        assert got == p.feed(done.token_ids, final=True)
        if not split:
            assert got.content == tok.decode(done.token_ids, skip_special=True)
