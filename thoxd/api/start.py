"""From a validated request to running generations: the rules every surface shares.

REST and WebSocket both call `start_chat` / `start_completion`, so the model lookup, the chat
template, tokenizing, the context-length check, sampling defaults and the `max_tokens` bound exist
once. What comes back is submitted to the engine already; the caller only reads events.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from thoxd.access import Caller
from thoxd.api.schemas import ChatRequest, CompletionRequest, GenerationBody
from thoxd.api.toolcalls import Output, PlainOutput
from thoxd.api.tools import ChatPlan, plan_chat, response_grammar
from thoxd.engine import Delta, Engine, Generation, GrammarSpec, LoadedModel, SamplingParams
from thoxd.errors import Forbidden, InvalidRequest, UnsupportedParameter


@dataclass
class Started:
    """Generations of one request, in choice order, all submitted; for a chat, how each choice's
    text is read back (plain, or tool calls)."""

    model_name: str  # as the client asked for it
    model: LoadedModel
    generations: list[Generation]
    plan: ChatPlan | None = None
    n: int = 1  # choices per prompt: generations[i * n + k] is prompt i's choice k

    def cancel(self) -> None:
        for gen in self.generations:
            gen.cancel()

    def outputs(self) -> list[Output]:
        return [self.plan.output() if self.plan else PlainOutput() for _ in self.generations]


def permit(engine: Engine, caller: Caller | None, name: str) -> None:
    """Refuse a model the caller's key does not open (before it is loaded for them)."""
    if caller is None or caller.models is None:
        return
    if not caller.may_use(engine.catalog.get(name).id):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise Forbidden(f"This key may not use the model '{shown}'.", param="model")


async def start_chat(engine: Engine, body: ChatRequest, caller: Caller | None = None) -> Started:
    """`caller`: who asks (thoxd/guards/access.py): its models, and the queue's fair share."""
    body.check_supported()
    permit(engine, caller, body.model)
    # Held from lookup to submit, so the model cannot be evicted in between; after that its
    # generations hold it until they end.
    async with engine.use(body.model, body.keep_alive) as model:
        plan = plan_chat(body, model.chat_template().source)
        text = model.render_chat(plan.messages, plan.tools)
        tokens = await model.tokenize(text, add_special=False)
        if plan.grammar is not None:
            await asyncio.to_thread(model.check_grammar, plan.grammar)
        started = _submit(model, body, [tokens], "messages", caller, grammar=plan.grammar)
        started.plan = plan
        return started


async def start_completion(
    engine: Engine, body: CompletionRequest, caller: Caller | None = None, *, turns: bool = False
) -> Started:
    """`turns`: each text prompt is a user's turn, put through the chat template of a model that
    chats (the seed routes' /generate: a prompt there is a question, not text to continue)."""
    body.check_supported()
    permit(engine, caller, body.model)
    grammar = response_grammar(body)
    async with engine.use(body.model, body.keep_alive) as model:
        if grammar is not None:
            await asyncio.to_thread(model.check_grammar, grammar)
        turns = turns and "chat" in model.spec.capabilities and model.template is not None
        if not turns and "completion" not in model.spec.capabilities:
            raise InvalidRequest(
                f"The model '{model.spec.id}' does not do text completions.", param="model"
            )
        suffix = None
        if body.suffix:
            if model.llama.fim is None:
                raise UnsupportedParameter(
                    f"The model '{model.spec.id}' has no fill-in-the-middle tokens, so it cannot"
                    " complete between a prompt and a 'suffix'.",
                    param="suffix",
                )
            suffix = await model.tokenize(body.suffix, add_special=False)
        prompts: list[list[int]] = []
        echoes: list[str] = []
        for prompt in split_prompts(body.prompt):  # at most 64 (schemas.py)
            if isinstance(prompt, str) and turns:
                text = model.render_chat([{"role": "user", "content": prompt}])
                tokens = await model.tokenize(text, add_special=False)
            elif isinstance(prompt, str):
                tokens = await model.tokenize(prompt, add_special=suffix is None)
            else:
                model.check_token_ids(prompt, "prompt")
                tokens = list(prompt)
            if body.echo:
                echoes.append(prompt if isinstance(prompt, str) else model.llama.detokenize(tokens))
            prompts.append(tokens if suffix is None else infill(model, tokens, suffix))
        return _submit(
            model, body, prompts, "prompt", caller, echoes if body.echo else None, grammar
        )


def infill(model: LoadedModel, prefix: list[int], suffix: list[int]) -> list[int]:
    """A fill-in-the-middle prompt, laid out as llama-server's /infill does (prefix, suffix,
    middle): the model then writes what goes between `prefix` and `suffix`."""
    llama = model.llama
    assert llama.fim is not None
    pre, suf, mid = llama.fim
    return [*([llama.bos] if llama.add_bos else []), pre, *prefix, suf, *suffix, mid]


def split_prompts(
    prompt: str | list[str] | list[int] | list[list[int]],
) -> list[str | list[int]]:
    """OpenAI's prompt/input forms as a list of single prompts (text, or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    items: list[str | list[int]] = []
    for item in prompt:
        if isinstance(item, int):
            return [[t for t in prompt if isinstance(t, int)]]
        items.append(item)
    return items


def sampling_params(model: LoadedModel, body: GenerationBody) -> SamplingParams:
    d = model.spec.defaults
    return SamplingParams(
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=d.top_k if body.top_k is None else body.top_k,
        min_p=d.min_p if body.min_p is None else body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=d.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
        seed=body.seed,
        logit_bias=body.bias,
    )


def _submit(
    model: LoadedModel,
    body: GenerationBody,
    prompts: list[list[int]],
    param: str,
    caller: Caller | None,
    echoes: list[str] | None = None,
    grammar: GrammarSpec | None = None,
) -> Started:
    for tokens in prompts:
        if not tokens:
            raise InvalidRequest("The prompt is empty.", param=param)
        model.check_fits(len(tokens), param)
    if body.n > (slots := model.stats().slots):
        raise InvalidRequest(
            f"n is at most {slots} on this device (the model's slots run the choices side by"
            f" side); {body.n} were asked for.",
            param="n",
        )
    params = sampling_params(model, body)
    model.check_token_ids([token for token, _ in params.logit_bias], "logit_bias")
    stops = (*model.spec.stop, *body.stops)
    stop_tokens = model.stop_tokens(stops)
    limit = body.token_limit or model.spec.defaults.max_tokens
    started = Started(body.model, model, [], n=body.n)
    for i, tokens in enumerate(prompts):
        room = model.n_ctx - len(tokens)
        leader: Generation | None = None
        for choice in range(body.n):  # choice k: index i * n + k, as OpenAI numbers them
            gen = Generation(
                prompt=tokens,
                # Each choice draws its own numbers: a seeded request stays reproducible.
                params=replace(params, seed=params.seed + choice)
                if params.seed is not None
                else params,
                max_tokens=room if limit is None else min(limit, room),
                stops=stops,
                stop_tokens=stop_tokens,
                grammar=grammar,
                logprobs=body.logprobs_wanted,
                fork_of=leader,
                client=caller.id if caller is not None else "",
            )
            leader = leader or gen
            if echoes is not None and echoes[i]:
                gen.push(Delta(echoes[i]))  # queued before any token the engine sends
            started.generations.append(gen)
    model.submit(*started.generations)  # one request, however many prompts: all run, or none
    return started
