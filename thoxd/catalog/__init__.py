"""The models the box can serve: `models.toml` entries, their files (assembly, sha256), the GGUF
header check every file passes before llama.cpp opens it, and the `thoxd models` CLI."""
