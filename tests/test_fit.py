"""A prompt fitted into num_ctx as Ollama fits one (plugin/fit.py): the oldest messages of a chat left out but its
system messages and its last, then a prompt still too long cut to its head and tail; through the engine and a real
`dgemma serve` (the Ollama and OpenAI APIs), and refused where a request says not to."""

from __future__ import annotations

import httpx
import openai
import pytest

from dgemma.plugin.engine import Engine, EngineError, GenerateOptions, TextEvent
from dgemma.plugin.fit import Fitted, fit_messages, fit_tokens, reply_room

BOS = 2


def test_fit_tokens_keeps_bos_the_first_num_keep_and_the_last():
    ids = [BOS] + list(range(100, 130))
    assert fit_tokens(ids, 31) is ids and fit_tokens(ids, 40) == ids
    assert fit_tokens(ids, 10, 4, BOS) == [BOS, 100, 101, 102, 103] + list(range(125, 130))
    assert fit_tokens(ids, 10, 4, None) == [BOS, 100, 101, 102] + list(range(124, 130))  # no BOS: num_keep alone
    assert fit_tokens(ids, 3, 4, BOS) == [BOS, 100, 129]  # the last token stays whatever num_keep asks
    assert fit_tokens(ids, 6, 0, BOS) == [BOS] + list(range(125, 130))
    assert reply_room(4096, 4096, 256) == 256 and reply_room(4096, 20, 256) == 20 and reply_room(100, 100, 256) == 50
    assert reply_room(4096, 0, 256) == 1


def _chat(n: int) -> list[dict]:
    """A system message, n turns (a tool call answered in the middle of some), a system note, the last message."""
    out = [{"role": "system", "content": "sys"}]
    for i in range(n):
        out.append({"role": "user", "content": f"question {i} " * (1 + i % 3)})
        if i % 4 == 1:
            out += [{"role": "assistant", "content": "", "calls": ["f"]}, {"role": "tool", "content": "42 " * 5}]
        out.append({"role": "assistant", "content": f"answer {i} " * 2})
        if i == n // 2:
            out.append({"role": "system", "content": "note"})
    return out + [{"role": "user", "content": "last " * 3}]


def _render(counter: list[int]):
    """A stand-in chat template: one token per word, two per message."""
    def render(messages: list[dict]) -> list[int]:
        counter.append(1)
        return [len(w) for m in messages for w in [m["role"], *m["content"].split(), "<end>"]]
    return render


@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_fit_messages_keeps_the_longest_tail_from_a_user_message(n):
    """Against every start tried in turn (Ollama's chatPrompt, but no tail starts at a tool's result): the same
    prompt, the system messages of the part left out first, in a few renders."""
    messages = _chat(n)
    whole = len(_render([])(messages))
    last = len(messages) - 1
    starts = [i for i in range(1, last) if messages[i]["role"] not in ("system", "tool")] + [last]
    for budget in range(4, whole + 2, 3):
        calls: list[int] = []
        ids, dropped = fit_messages(_render(calls), messages, budget)
        if whole <= budget:
            assert dropped == 0 and len(calls) == 1
            continue
        def tail(i: int) -> list[dict]:
            return [m for m in messages[:i] if m["role"] == "system"] + messages[i:]

        start = next((i for i in starts if len(_render([])(tail(i))) <= budget), last)
        assert ids == _render([])(tail(start)) and tail(start)[0] == messages[0]  # the system message stays
        assert dropped == sum(1 for m in messages[:start] if m["role"] != "system")
        assert len(calls) <= 2 + len(starts).bit_length()


def test_the_engine_fits_a_chat_into_num_ctx(default_gguf):
    engine = Engine.load(default_gguf)
    chat = [{"role": "system", "content": "Be brief."}]
    for i in range(20):
        chat += [{"role": "user", "content": f"Tell me about the number {i}, please."},
                 {"role": "assistant", "content": f"The number {i} is a number."}]
    chat.append({"role": "user", "content": "And now?"})
    whole = engine.prompt_ids(chat)
    o = GenerateOptions(num_ctx=200, max_tokens=8, truncate=True)
    budget = engine.prompt_budget(o)
    assert budget == 200 - min(8, engine.cfg.canvas_length) and len(whole) > budget
    f = engine.fitted_ids(chat, o)
    assert isinstance(f, Fitted) and f.cut == 0 and 0 < f.dropped < len(chat) - 2
    assert f.ids == engine.prompt_ids([chat[0]] + chat[1 + f.dropped:]) and len(f.ids) <= budget
    # one message more would not have fit
    assert len(engine.prompt_ids([chat[0]] + chat[f.dropped - 1:])) > budget
    # a generation with it answers; without truncate the prompt is refused, as before
    done = list(engine.generate(chat, GenerateOptions(num_ctx=200, max_tokens=8, truncate=True, seed=1)))[-1]
    assert done.prompt_eval_count == len(f.ids) and done.eval_count > 0
    with pytest.raises(EngineError, match="does not fit the context of 200"):
        list(engine.generate(chat, GenerateOptions(num_ctx=200, max_tokens=8)))
    # one message too long: cut to its head and tail, the generation prompt kept
    huge = [{"role": "user", "content": "word " * 400}]
    cut = engine.fitted_ids(huge, o)
    assert cut.dropped == 0 and len(cut.ids) == budget and cut.cut == len(engine.prompt_ids(huge)) - budget
    assert cut.ids[:5] == engine.prompt_ids(huge)[:5] and cut.ids[-20:] == engine.prompt_ids(huge)[-20:]


def _long_chat(n: int = 40) -> list[dict]:
    chat = [{"role": "system", "content": "Be brief."}]
    for i in range(n):
        chat += [{"role": "user", "content": f"Tell me about the number {i} and its friends. " * 2},
                 {"role": "assistant", "content": "It is a fine number indeed. " * 2}]
    return chat + [{"role": "user", "content": "And now?"}]


def test_the_server_fits_a_long_chat_as_ollama_does(server, engine):
    """/api/chat past num_ctx is answered from the conversation's latest messages, as the engine answers them
    alone; `truncate: false` is a 400; /api/generate's long prompt is cut to fit; OpenAI's chat completions fit
    (a model whose PARAMETER num_ctx is 300), and /v1/responses unless `truncation: "disabled"`."""
    from dgemma.plugin.server.serving import generate_options

    chat = _long_chat()
    options = {"num_ctx": 300, "num_predict": 6, "seed": 4}
    o = generate_options(engine, options)
    f = engine.fitted_ids(chat, o)
    assert o.truncate and f.dropped > 0 and f.cut == 0
    alone = "".join(e.text for e in engine.generate(chat, o) if isinstance(e, TextEvent))
    r = httpx.post(f"{server}/api/chat", json={"model": "default", "messages": chat, "stream": False,
                                                "options": options}, timeout=120).json()
    assert r["prompt_eval_count"] == len(f.ids) <= engine.prompt_budget(o) and r["message"]["content"] == alone
    refused = httpx.post(f"{server}/api/chat", json={"model": "default", "messages": chat, "stream": False,
                                                      "options": options, "truncate": False}, timeout=120)
    assert refused.status_code == 400 and "does not fit the context of 300" in refused.json()["error"]
    g = httpx.post(f"{server}/api/generate", json={"model": "default", "prompt": "word " * 500, "stream": False,
                                                    "options": options}, timeout=120).json()
    assert g["prompt_eval_count"] == engine.prompt_budget(o) and g["eval_count"] > 0

    made = httpx.post(f"{server}/api/create", json={"model": "small", "from": "default", "stream": False,
                                                     "parameters": {"num_ctx": 300}}, timeout=120)
    assert made.status_code == 200, made.text
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    c = client.chat.completions.create(model="small", messages=chat, max_tokens=6, seed=4)
    assert c.usage.prompt_tokens == len(f.ids) and c.choices[0].message.content == r["message"]["content"]
    responses = client.responses.create(model="small", input=chat[1:], instructions=chat[0]["content"],
                                        max_output_tokens=6)
    assert 0 < responses.usage.input_tokens <= 300
    with pytest.raises(openai.BadRequestError, match="does not fit the context of 300"):
        client.responses.create(model="small", input=chat[1:], max_output_tokens=6, truncation="disabled")
