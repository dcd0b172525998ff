"""Writing artifacts in the formats other engines load (GGUF for llama.cpp)."""
