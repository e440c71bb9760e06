"""`dgemma run MODEL` at a terminal without a prompt: a chat, turn by turn, as `ollama run MODEL` opens one.

Each turn sends the whole conversation through the model's chat template and streams the reply a canvas at a
time (the thinking, where the model writes any, between "Thinking..." and "...done thinking.", as ollama run
prints it). Commands, as Ollama's: /? (help), /bye, /clear, /set system, /set parameter, /set think, /set nothink,
/set format json, /set noformat, /show info; a message (or
a /set system text) in triple quotes spans lines. Ctrl+C stops a reply at its next denoising step (the turn is dropped); at the
prompt it says how to leave; Ctrl+D leaves.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from .chat import ChatTemplateError, template_features
from .engine import DoneEvent, Engine, EngineError, GenerateOptions, TextEvent

PROMPT, CONTINUATION, QUOTES = ">>> ", "... ", '"""'
HELP = f"""Available commands:
  /set system <text>           set the system message (for the turns that follow)
  /set parameter <name> <n>    seed (negative: random), num_predict (negative: up to the model's default) or
                               diffusion_steps; /set parameter <name> alone unsets it
  /set think, /set nothink     the chat template's thinking mode on / off
  /set format json             replies as JSON objects (JSON mode); /set noformat: as the model writes them
  /show info                   the model and what runs it
  /clear                       clear the conversation
  /bye                         exit
  /?, /help                    this help

Use {QUOTES} to begin and end a message of several lines."""
# /set parameter names (Ollama's, and the server's diffusion option) -> GenerateOptions fields
PARAMETERS = {"seed": "seed", "num_predict": "max_tokens", "diffusion_steps": "steps"}


@dataclass
class Session:
    options: GenerateOptions  # each turn's (a copy, with its own cancel flag)
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # user and assistant turns
    history: list[dict[str, Any]] = field(default_factory=list)  # a Modelfile's MESSAGEs, before them (/clear keeps)
    think: bool | None = None  # the chat template's enable_thinking (None: the template's default)
    hide_thinking: bool = False

    def conversation(self, text: str) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + self.messages + [{"role": "user", "content": text}]


def quoted(text: str, read: Callable[[str], str]) -> str:
    """`text` as it is, or, where it opens with triple quotes, up to the line that closes them (read further)."""
    if not text.lstrip().startswith(QUOTES):
        return text
    lines, rest = [], text.lstrip()[len(QUOTES):]
    while not rest.rstrip().endswith(QUOTES):
        lines.append(rest)
        rest = read(CONTINUATION)
    lines.append(rest.rstrip()[:-len(QUOTES)])
    return "\n".join(lines).strip("\n")


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line, or the lines between two triple quotes. EOFError at the end of input."""
    return quoted(read(PROMPT), read)


def _parameter(name: str, value: int | None) -> tuple[int | None, str | None]:
    """A /set parameter value as GenerateOptions takes it, or the reason it is refused."""
    if value is not None and value < 0 and name in ("seed", "num_predict"):
        return None, None  # (random; the default length, as the server reads a negative num_predict)
    if value is not None and value < 1 and name in ("num_predict", "diffusion_steps"):
        return None, f"'{name}' must be at least 1"
    return value, None


def command(session: Session, engine: Engine, line: str, out: TextIO, read: Callable[[str], str]) -> bool:
    """Run a /command (a /set system text may span lines in triple quotes); False for /bye."""
    words = line.split()
    name, args = words[0], words[1:]
    if name == "/bye":
        return False
    if name in ("/?", "/help"):
        print(HELP, file=out)
    elif name == "/clear":
        session.messages.clear()
        print("Cleared session context", file=out)
    elif name == "/show" and args[:1] == ["info"]:
        c = engine.cfg
        print(f"  model        {engine.path.name}\n  layers       {c.n_layer}\n  context      {c.context_length}\n"
              f"  canvas       {c.canvas_length}\n  runs on      {engine.describe()}", file=out)
    elif name == "/set" and args in (["think"], ["nothink"]):
        if args == ["think"] and not template_features(engine.tokenizer).thinking:
            print("Couldn't set 'think' mode: the model's chat template has no thinking mode", file=out)
            return True
        if args == ["think"] and session.options.format:
            print("Couldn't set 'think' mode: JSON mode leaves out the thinking (/set noformat first)", file=out)
            return True
        session.think = args == ["think"]
        print("Set 'think' mode." if session.think else "Set 'nothink' mode.", file=out)
    elif name == "/set" and args in (["format", "json"], ["noformat"]):
        if args != ["noformat"] and session.think:
            print("Couldn't set format: JSON mode leaves out the thinking (/set nothink first)", file=out)
            return True
        session.options.format = None if args == ["noformat"] else "json"
        print("Set format to 'json' mode." if session.options.format else "Disabled format.", file=out)
    elif name == "/set" and args[:1] == ["system"] and len(args) > 1:
        session.system = quoted(line.split(None, 2)[2], read).strip()
        print("Set system message.", file=out)
    elif name == "/set" and args[:1] == ["parameter"] and len(args) in (2, 3) and args[1] in PARAMETERS:
        try:
            value, refused = _parameter(args[1], int(args[2]) if len(args) == 3 else None)
        except ValueError:
            value, refused = None, f"'{args[2]}' is not a whole number"
        if refused:
            print(f"Couldn't set parameter: {refused}", file=out)
            return True
        setattr(session.options, PARAMETERS[args[1]], value)
        print(f"Set parameter '{args[1]}' to '{args[2]}'" if len(args) == 3 else f"Unset parameter '{args[1]}'",
              file=out)
    else:
        print(f"Unknown command '{line.strip()}'. Type /? for help", file=out)
    return True


class ThoughtPrinter:
    """A reply's parts as `ollama run` prints them: the thinking (unless hidden) between "Thinking..." and
    "...done thinking.", then the answer."""

    def __init__(self, out: TextIO, hide: bool = False) -> None:
        self.out, self.hide, self.open = out, hide, False

    def write(self, event: TextEvent) -> None:
        if event.thinking and not self.hide:
            if not self.open:
                self.out.write("Thinking...\n")
                self.open = True
            self.out.write(event.thinking)
        if event.text:
            self.close()
            self.out.write(event.text)
        self.out.flush()

    def close(self) -> None:
        if self.open:
            self.out.write("\n...done thinking.\n\n")
            self.open = False


def reply(session: Session, engine: Engine, text: str, out: TextIO, err: TextIO,
          stats: Callable[[DoneEvent], list[str]] | None) -> None:
    """One turn: the reply streamed to `out`; the turn kept unless Ctrl+C stopped it or the engine refused it."""
    cancel = threading.Event()
    options = replace(session.options, cancel=cancel, split_thinking=True)
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # (the engine stops at its next step)
    done, parts, printer = None, [], ThoughtPrinter(out, session.hide_thinking)
    try:
        think = {} if session.think is None else {"enable_thinking": session.think}
        for event in engine.generate(session.conversation(text), options, **think):
            if isinstance(event, TextEvent):
                parts.append(event.text)
                printer.write(event)
            else:
                done = event
        printer.close()
    except (EngineError, ChatTemplateError) as e:  # a prompt past the context, say: the session goes on
        if parts:
            print(file=out)
        print(f"Error: {e}", file=err)
        return
    finally:
        signal.signal(signal.SIGINT, previous)
    print("\n", file=out)
    if done is None or done.done_reason == "cancelled":
        return
    session.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(parts)}]
    if stats is not None:
        print("\n".join(stats(done)), file=err)


def chat(engine: Engine, options: GenerateOptions, system: str | None = None, *, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         stats: Callable[[DoneEvent], list[str]] | None = None, think: bool | None = None,
         hide_thinking: bool = False, history: list[dict[str, Any]] | None = None) -> int:
    """The conversation loop, until /bye or the end of input; 0. `history`: the turns every conversation starts
    from (a Modelfile's MESSAGEs)."""
    try:
        import readline  # noqa: F401 - line editing and history for input(), where the platform has it
    except ImportError:
        pass
    session = Session(options, system, think=think, hide_thinking=hide_thinking, history=list(history or []))
    print("Send a message (/? for help)", file=out)
    while True:
        try:  # Ctrl+C anywhere but in a reply (whose own handler stops it) comes back to the prompt
            text = read_message(read)
            if not text.strip():
                continue
            if text.startswith("/"):
                if not command(session, engine, text, out, read):
                    return 0
                continue
            reply(session, engine, text, out, err, stats)
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.", file=out)
        except EOFError:
            print(file=out)
            return 0
