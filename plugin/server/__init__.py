"""dgemma serve: the Ollama- and OpenAI-compatible HTTP server."""
