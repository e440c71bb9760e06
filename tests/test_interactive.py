"""`dgemma run MODEL` at a terminal without a prompt: the chat loop (plugin/interactive.py), driven by a script
of input lines, and once through a real pseudo-terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import THOUGHT_CHANNEL_TOKENS

from dgemma.plugin.engine import Engine, GenerateOptions, TextEvent
from dgemma.plugin.interactive import chat, read_message


@pytest.fixture(scope="module")
def engine(default_gguf) -> Engine:
    return Engine.load(default_gguf)


def script(*lines: str):
    """input() stand-in: the lines in order, then the end of input; records the prompts it was shown."""
    feed, shown = list(lines), []

    def read(prompt: str) -> str:
        shown.append(prompt)
        if not feed:
            raise EOFError
        line = feed.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line

    return read, shown


def alone(engine: Engine, conversation, seed: int, n: int) -> str:
    opts = GenerateOptions(seed=seed, max_tokens=n)
    return "".join(e.text for e in engine.generate(conversation, opts) if isinstance(e, TextEvent))


def test_multi_line_messages():
    read, shown = script('"""first', "second", 'third"""')
    assert read_message(read) == "first\nsecond\nthird" and shown == [">>> ", "... ", "... "]
    assert read_message(script('"""one line"""')[0]) == "one line"
    assert read_message(script("plain")[0]) == "plain"


def test_a_conversation_with_commands(engine, monkeypatch):
    seen = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda conv, opts: seen.append((conv, opts.seed)) or generate(conv, opts))
    read, shown = script("/?", "hello", '"""two', 'lines"""', "/set parameter seed x", "/set parameter seed 3",
                         "again", "/show info", "/clear", "/set system be brief", "after", "/nope", KeyboardInterrupt(),
                         "", "/bye", "never read")
    out, err, dones = io.StringIO(), io.StringIO(), []
    assert chat(engine, GenerateOptions(seed=1, max_tokens=6), read=read, out=out, err=err,
                stats=lambda d: dones.append(d) or ["stats"]) == 0
    text = out.getvalue()
    assert text.startswith("Send a message (/? for help)\n") and "/set parameter <name> <n>" in text
    assert "Couldn't set parameter: 'x' is not a whole number" in text and "Set parameter 'seed' to '3'" in text
    assert f"model        {engine.path.name}" in text and "Cleared session context" in text
    assert "Unknown command '/nope'. Type /? for help" in text and "Use Ctrl + d or /bye to exit." in text
    assert shown.count(">>> ") == 14 and shown.count("... ") == 1  # ("never read" is not)
    convs = [c for c, _ in seen]
    assert [len(c) for c in convs] == [1, 3, 5, 2] and [s for _, s in seen] == [1, 1, 3, 3]
    first = alone(engine, convs[0], 1, 6)  # each reply is what the engine gives that conversation alone
    assert convs[1][:2] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    assert convs[1][2] == {"role": "user", "content": "two\nlines"}
    assert convs[3] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "after"}]
    # each turn took the last one's prompt, but for its thought channel, from the KV cache it left
    assert len(dones) == 4
    first_prompt = len(engine.prompt_ids(convs[0]))
    assert first_prompt - THOUGHT_CHANNEL_TOKENS < dones[1].prompt_cached_count < first_prompt
    last = alone(engine, convs[3], 3, 6)
    assert last.strip() and last in text and err.getvalue() == "stats\n" * 4  # (an empty reply would be in any text)


def test_ctrl_c_stops_a_reply_and_drops_the_turn(engine):
    """SIGINT during a reply sets the engine's cancel flag (it stops at its next denoising step); the turn is
    not kept, the chat goes on, and the terminal's own Ctrl+C handling is back afterwards."""
    steps = []

    def interrupt(info) -> None:
        steps.append(info.index)
        if len(steps) == 1:
            signal.raise_signal(signal.SIGINT)

    seen = []
    generate = engine.generate
    engine.generate = lambda conv, opts: seen.append(conv) or generate(conv, opts)
    before = signal.getsignal(signal.SIGINT)
    try:
        read, _ = script("stopped", "kept")
        opts = GenerateOptions(seed=1, max_tokens=64, on_step=interrupt)
        assert chat(engine, opts, read=read, out=io.StringIO(), err=io.StringIO()) == 0
    finally:
        del engine.generate
    assert seen[1] == [{"role": "user", "content": "kept"}]  # the stopped turn is gone
    assert signal.getsignal(signal.SIGINT) is before


def test_parameters_system_text_and_errors_keep_the_session(engine, monkeypatch):
    """Values as the server reads them (a negative seed: random; a negative num_predict: the default length),
    those the engine would refuse are refused at /set; a /set system text in triple quotes spans lines; a
    template error or Ctrl+C between turns (here in --stats' printing) leaves the chat running."""
    from dgemma.plugin.chat import ChatTemplateError

    seen = []
    generate = engine.generate

    def spy(conv, opts):
        seen.append((conv, opts.seed, opts.max_tokens, opts.steps))
        if conv[-1]["content"] == "boom":
            raise ChatTemplateError("chat template failed: nope")
        return generate(conv, opts)

    def stats(done):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "generate", spy)
    read, _ = script("/set parameter seed 4", "/set parameter seed -1", "/set parameter num_predict -1",
                     "/set parameter num_predict 0", "/set parameter diffusion_steps 0", "/set parameter diffusion_steps 2",
                     '/set system """be', 'brief"""', "boom", "hi", "/bye")
    out, err = io.StringIO(), io.StringIO()
    assert chat(engine, GenerateOptions(max_tokens=5), read=read, out=out, err=err, stats=stats) == 0
    text = out.getvalue()
    assert "Unset parameter 'seed'" not in text and "Set parameter 'seed' to '-1'" in text
    assert text.count("Couldn't set parameter: ") == 2 and "'diffusion_steps' must be at least 1" in text
    assert err.getvalue() == "Error: chat template failed: nope\n" and "Use Ctrl + d or /bye to exit." in text
    (boom, *_), (hi, seed, max_tokens, steps) = seen
    assert hi == [{"role": "system", "content": "be\nbrief"}, {"role": "user", "content": "hi"}]  # boom's is gone
    assert (seed, max_tokens, steps) == (None, None, 2)


def test_dgemma_run_opens_a_chat_at_a_terminal(tmp_path):
    """The real command on a pseudo-terminal: the greeting, a reply to a message, /bye, exit 0; with --json (one
    prompt's output) and no prompt it is a one-line error instead, before the model loads."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "dgemma.plugin.cli", "run", "default", "--seed", "1",
                             "--max-tokens", "6"], stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    os.write(primary, b"hello there\n/bye\n")
    seen, deadline = b"", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                seen += os.read(primary, 4096)
            except OSError:
                break
    proc.wait(10)
    os.close(primary)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Send a message (/? for help)" in text and text.count(">>> ") >= 2
    primary, secondary = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "run", "default", "--json"], stdin=secondary,
                          capture_output=True, text=True, timeout=120)
    os.close(secondary)
    os.close(primary)
    assert proc.returncode == 1 and proc.stderr == ("dgemma: error: --json needs a PROMPT (an argument or stdin); "
                                                    "without one, at a terminal, dgemma run opens a chat\n")


def test_think_mode_and_the_thinking_printed(engine, monkeypatch):
    """/set think and /set nothink switch the template's thinking mode for the turns after them; the thinking
    is printed as ollama run prints it (or left out with --hidethinking), the answer kept alone in the history."""
    from dgemma.plugin.interactive import ThoughtPrinter

    seen = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate",
                        lambda conv, opts, **kw: seen.append((len(conv), opts.split_thinking, kw)) or generate(conv, opts, **kw))
    read, _ = script("/set think", "hi", "/set nothink", "hi")
    out = io.StringIO()
    assert chat(engine, GenerateOptions(seed=1, max_tokens=4), read=read, out=out, err=io.StringIO()) == 0
    assert seen == [(1, True, {"enable_thinking": True}), (3, True, {"enable_thinking": False})]
    assert "Set 'think' mode." in out.getvalue() and "Set 'nothink' mode." in out.getvalue()
    assert len(engine.prompt_ids([{"role": "user", "content": "hi"}], enable_thinking=True)) != \
        len(engine.prompt_ids([{"role": "user", "content": "hi"}]))

    events = [TextEvent("", [], 0, 1, "Let me"), TextEvent("", [], 1, 1, " think."), TextEvent("Hi!", [], 2, 1),
              TextEvent(" Bye", [], 3, 1)]
    for hide, want in ((False, "Thinking...\nLet me think.\n...done thinking.\n\nHi! Bye"), (True, "Hi! Bye")):
        buf = io.StringIO()
        printer = ThoughtPrinter(buf, hide)
        for e in events:
            printer.write(e)
        assert buf.getvalue() == want


def test_set_format_json(engine):
    """/set format json: the next replies are JSON objects (JSON mode), /set noformat: as the model writes them;
    not together with /set think."""
    import json

    read, _ = script("/set format json", "hello", "/set think", "/set noformat", "again", "/bye")
    out, err = io.StringIO(), io.StringIO()
    assert chat(engine, GenerateOptions(seed=1, max_tokens=20), read=read, out=out, err=err) == 0
    text = out.getvalue()
    assert "Set format to 'json' mode." in text and "Disabled format." in text
    assert "Couldn't set 'think' mode: JSON mode leaves out the thinking" in text
    conv = [{"role": "user", "content": "hello"}]
    reply = "".join(e.text for e in engine.generate(conv, GenerateOptions(seed=1, max_tokens=20, format="json"))
                    if isinstance(e, TextEvent))
    assert isinstance(json.loads(reply), dict) and reply in text
