"""The only code that touches llama.cpp. The rest of thoxd uses these names and nothing else:

    Engine, EngineConfig   catalog models loaded on demand within a memory budget (runtime.py)
    LoadedModel            one resident model: tokenizer, chat template, scheduler (model.py)
    Generation             one request for tokens and the channel its events come back by
    Delta, Finished, Failed, Timings
                           those events, and llama-server's timing fields (request.py)
    Embedding              one embeddings request, embedded between steps (request.py, embed.py)
    Faults                 the seam where tests make the engine fail (faults.py)
    SamplingParams, GrammarSpec, TokenLogprob
                           how a request's next tokens are picked, what they must match (JSON
                           mode, tool calls), and their log probabilities (sampling.py)
    json_grammar, UnsupportedSchema
                           a JSON Schema as a grammar, or why it cannot be one (schema.py)
    budget_bytes           the memory budget setting in bytes (memory.py)
    system_info, supports_gpu_offload
                           what this llama.cpp build can do, for /system/info (llama.py)

The inner modules are the engine's own; tests and benchmarks may reach into them.
"""

from thoxd.engine.devices import supports_gpu_offload
from thoxd.engine.faults import Faults
from thoxd.engine.llama import system_info
from thoxd.engine.memory import budget_bytes
from thoxd.engine.model import EngineConfig, LoadedModel
from thoxd.engine.request import Delta, Embedding, Failed, Finished, Generation, Timings
from thoxd.engine.runtime import Engine
from thoxd.engine.sampling import GrammarSpec, SamplingParams, TokenLogprob
from thoxd.engine.schema import UnsupportedSchema, json_grammar

__all__ = [
    "Delta",
    "Embedding",
    "Engine",
    "EngineConfig",
    "Failed",
    "Faults",
    "Finished",
    "Generation",
    "GrammarSpec",
    "LoadedModel",
    "SamplingParams",
    "Timings",
    "TokenLogprob",
    "UnsupportedSchema",
    "budget_bytes",
    "json_grammar",
    "supports_gpu_offload",
    "system_info",
]
