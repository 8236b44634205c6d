"""The OpenAI routes again under `/api` and `/api/v1` (the Roxy docs' paths; the Rax docs'
base URL is `/api/v1` too): the same handlers, so the same shapes, streaming with
`stream_options.include_usage`, and errors in OpenAI's envelope. `/api/v1/usage` is in usage.py.
"""

from __future__ import annotations

from starlette.routing import Route

from thoxd.api.models import ModelRoutes
from thoxd.api.openai import OpenAIRoutes


def roxy_routes(openai: OpenAIRoutes, models: ModelRoutes) -> list[Route]:
    routes = []
    for prefix in ("/api", "/api/v1"):
        routes += [
            Route(f"{prefix}/chat/completions", openai.chat, methods=["POST"]),
            Route(f"{prefix}/completions", openai.completions, methods=["POST"]),
            Route(f"{prefix}/embeddings", openai.embeddings, methods=["POST"]),
            Route(f"{prefix}/models", models.list_models, methods=["GET"]),
            Route(f"{prefix}/models/{{model_id:path}}", models.get_model, methods=["GET"]),
        ]
    return routes
