"""From validated requests to the ``request`` a job stores (`contract.payload.job_payload`), with the
checks that need the model: it is served, the prompt fits its context, max_tokens fits what is left."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.errors import ApiError
from api.registry import ModelRegistry, PromptError, ServedModel
from api.schemas.jobs import JobCreate
from api.schemas.openai import ChatCompletionRequest, CompletionRequest
from contract.guided import GUIDED_FIELDS, GuideError, check_grammar, grammar_of
from contract.payload import job_payload
from contract.sampling import DEFAULT_MAX_TOKENS, guided_conflict_problem, min_tokens_problem

# OpenAI field -> engine field, for the fields that pass through unchanged
_PASSTHROUGH = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
                "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                *GUIDED_FIELDS)


@dataclass(frozen=True)
class Prepared:
    """A request ready to store: the payload, the model, and the prompt's token count (if counted)."""

    model: str
    payload: dict[str, Any]
    prompt_tokens: int | None
    max_tokens: int


def served_model(registry: ModelRegistry, name: str) -> ServedModel:
    """The served model, or a 404 naming the field."""
    model = registry.get(name)
    if model is None:
        served = ", ".join(registry.names()) or "none"
        raise ApiError(404, f"model {name!r} is not served here; served models: {served}", param="model",
                       code="model_not_found")
    return model


def _count(model: ServedModel, prompt: str | list[int] | None, messages: list[dict[str, str]] | None,
           param: str) -> int | None:
    if isinstance(prompt, list):
        if model.vocab_size is not None:
            bad = next((t for t in prompt if t >= model.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is outside the vocabulary of {model.name!r} "
                                    f"(0..{model.vocab_size - 1})", param=param, code="invalid_value")
        return len(prompt)
    if not model.counts_tokens:
        return None
    try:
        return model.count_messages(messages) if messages is not None else model.count_text(prompt or "")
    except PromptError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None


def fit_max_tokens(model: ServedModel, prompt_tokens: int | None, max_tokens: int | None, default: int,
                   *, param: str, prompt_param: str) -> int:
    """Checks the prompt against the context and picks or checks max_tokens.

    ``default`` applies when the client named no max_tokens, capped by what the context leaves; a
    max_tokens the client named must fit, or it is a 400 naming ``param``.
    """
    ctx = model.context_length
    if prompt_tokens is not None and prompt_tokens == 0:
        raise ApiError(400, "the prompt is empty", param=prompt_param, code="invalid_value")
    if ctx is None or prompt_tokens is None:
        return max_tokens if max_tokens is not None else default
    if prompt_tokens >= ctx:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens but {model.name!r} has a context of {ctx} "
                            "tokens (prompt plus at least one generated token); shorten it",
                       param=prompt_param, code="context_length_exceeded")
    room = ctx - prompt_tokens
    if max_tokens is None:
        return min(default, room)
    if max_tokens > room:
        raise ApiError(400, f"max_tokens is {max_tokens} but the prompt ({prompt_tokens} tokens) leaves room for "
                            f"at most {room} in the {ctx}-token context of {model.name!r}",
                       param=param, code="context_length_exceeded")
    return max_tokens


def prepare_job(req: JobCreate, registry: ModelRegistry) -> Prepared:
    """A /v1/jobs request as a job payload."""
    model = served_model(registry, req.model)
    messages = [m.plain() for m in req.messages] if req.messages is not None else None
    param = "messages" if messages is not None else "prompt"
    prompt_tokens = _count(model, req.prompt, messages, param)
    _check_n_streams(req.params.n, req.stream, "params.n")
    params = req.params.engine_dict()
    check_guided(params, "params.")
    max_tokens = fit_max_tokens(model, prompt_tokens, params.get("max_tokens"), DEFAULT_MAX_TOKENS,
                                param="params.max_tokens", prompt_param=param)
    params["max_tokens"] = max_tokens
    _check_min_tokens(params, "params.min_tokens")
    payload = job_payload(prompt=req.prompt, messages=messages, params=params, stream=req.stream)
    return Prepared(req.model, payload, prompt_tokens, max_tokens)


def _check_min_tokens(params: dict[str, Any], param: str) -> None:
    # Again once max_tokens is known: a default max_tokens, or one the context shortened, may be
    # below a min_tokens the request model could not compare it with.
    problem = min_tokens_problem(params.get("min_tokens", 0), params["max_tokens"])
    if problem:
        raise ApiError(400, problem, param=param, code="invalid_value")


def check_guided(params: dict[str, Any], prefix: str = "") -> None:
    """The guided-decoding fields of ``params`` (contract.guided's rules): a 400 naming the field
    for an invalid schema, regex or grammar, or for a field that cannot go with one."""
    try:
        found = grammar_of(params)
        if found is not None:
            check_grammar(*found)
    except GuideError as exc:
        raise ApiError(400, f"{prefix}{exc}", param=prefix + exc.param, code="invalid_value") from None
    conflict = guided_conflict_problem(found is not None, params.get("min_tokens", 0), bool(params.get("ignore_eos")))
    if conflict:
        raise ApiError(400, conflict, param=prefix + ("min_tokens" if params.get("min_tokens") else "ignore_eos"),
                       code="invalid_value")


def _check_n_streams(n: int | None, stream: bool, param: str) -> None:
    # A stream carries one completion's text; n > 1 is answered whole.
    if stream and (n or 1) > 1:
        raise ApiError(400, f"{param} > 1 cannot stream; send stream: false (the answer holds every choice)",
                       param=param, code="invalid_value")


def _common_params(req: CompletionRequest | ChatCompletionRequest, stream: bool) -> dict[str, Any]:
    _check_n_streams(req.n, stream, "n")
    params: dict[str, Any] = {}
    for name in _PASSTHROUGH:
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    check_guided(params)
    return params


def prepare_completion(req: CompletionRequest, registry: ModelRegistry, *, stream: bool) -> Prepared:
    """A /v1/completions request as a job payload (``api`` records the endpoint for the answer)."""
    model = served_model(registry, req.model)
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a list holding one prompt
    prompt_tokens = _count(model, prompt, None, "prompt")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ApiError(400, f"best_of ({req.best_of}) other than n ({req.n or 1}) is not supported: "
                            "every completion made is returned", param="best_of", code="invalid_value")
    params = _common_params(req, stream)
    params["max_tokens"] = fit_max_tokens(model, prompt_tokens, req.max_tokens, DEFAULT_MAX_TOKENS,
                                          param="max_tokens", prompt_param="prompt")
    _check_min_tokens(params, "min_tokens")
    if req.logprobs is not None:
        params["logprobs"] = req.logprobs
    payload = job_payload(prompt=prompt, params=params, stream=stream)
    payload["api"] = "completions"
    return Prepared(req.model, payload, prompt_tokens, params["max_tokens"])


def prepare_chat(req: ChatCompletionRequest, registry: ModelRegistry, *, default_max_tokens: int,
                 stream: bool) -> Prepared:
    """A /v1/chat/completions request as a job payload."""
    model = served_model(registry, req.model)
    messages = [m.plain() for m in req.messages]
    prompt_tokens = _count(model, None, messages, "messages")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one of them",
                       param="max_completion_tokens", code="invalid_value")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = _common_params(req, stream)
    params["max_tokens"] = fit_max_tokens(model, prompt_tokens, asked, default_max_tokens, param=param,
                                          prompt_param="messages")
    _check_min_tokens(params, "min_tokens")
    if req.logprobs:
        params["logprobs"] = req.top_logprobs or 0
    elif req.top_logprobs is not None:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    payload = job_payload(messages=messages, params=params, stream=stream)
    payload["api"] = "chat"
    return Prepared(req.model, payload, prompt_tokens, params["max_tokens"])
