"""dgemma serve: the Ollama- and OpenAI-compatible HTTP server."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435  # (Ollama itself listens on 11434)
