"""Export checkpoints to other runtimes' formats (GGUF for llama.cpp / Ollama)."""
