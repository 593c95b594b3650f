"""OpenAI-compatible request and response models: /v1/completions, /v1/chat/completions, /v1/models.

An unknown request field is a 400 naming it, as OpenAI answers ("unrecognized request argument"):
a misspelt parameter must not silently do nothing. OpenAI fields that do not change the answer
(user, metadata, store, service_tier, ...) are accepted and ignored; fields that would change it and
are not supported (echo, suffix, logit_bias, tools) are refused with a 400 naming them. Structured output: OpenAI's response_format and vLLM's
guided_json, guided_regex, guided_choice and guided_grammar (`contract.guided`). vLLM-style
extra sampling fields (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
skip_special_tokens) are accepted under vLLM's names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from api.schemas.messages import Messages
from api.schemas.sampling import (
    GuidedChoiceField,
    GuidedGrammarField,
    GuidedJsonField,
    GuidedRegexField,
    Number,
    ResponseFormatField,
    StopString,
    StopTokenIds,
    TokenId,
    bounds,
    check_stop_count,
)

PromptText = Annotated[str, Field(min_length=1, max_length=10_000_000)]
PromptIds = Annotated[list[TokenId], Field(min_length=1, max_length=1_000_000)]


class StreamOptions(BaseModel):
    """Streaming options: ``include_usage`` adds a last chunk with the usage."""

    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """The sampling fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: StrictInt | None = Field(None, **bounds("max_tokens"))
    temperature: Number | None = Field(None, **bounds("temperature"))
    top_p: Number | None = Field(None, **bounds("top_p"))
    n: StrictInt | None = Field(None, **bounds("n"))
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = None
    presence_penalty: Number | None = Field(None, **bounds("presence_penalty"))
    frequency_penalty: Number | None = Field(None, **bounds("frequency_penalty"))
    logit_bias: dict[str, Number] | None = None
    seed: StrictInt | None = Field(None, **bounds("seed"))
    user: str | None = Field(None, max_length=256)
    # OpenAI fields that change nothing here: accepted so that OpenAI clients' payloads pass
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = Field(None, max_length=64)
    parallel_tool_calls: StrictBool | None = None
    prompt_cache_key: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    # vLLM-style extras
    top_k: StrictInt | None = Field(None, **bounds("top_k"))
    min_p: Number | None = Field(None, **bounds("min_p"))
    repetition_penalty: Number | None = Field(None, **bounds("repetition_penalty"))
    min_tokens: StrictInt | None = Field(None, **bounds("min_tokens"))
    ignore_eos: StrictBool | None = None
    stop_token_ids: StopTokenIds | None = None
    skip_special_tokens: StrictBool | None = None
    priority: StrictInt | None = Field(None, ge=0, le=9, description="inside the engine, lower runs first")
    # Guided decoding: OpenAI's response_format (also on completions, as vLLM takes it) and vLLM's names
    response_format: ResponseFormatField = None
    guided_json: GuidedJsonField = None
    guided_regex: GuidedRegexField = None
    guided_choice: GuidedChoiceField = None
    guided_grammar: GuidedGrammarField = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: object) -> object:
        return check_stop_count(value)

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: PromptText | PromptIds | Annotated[list[PromptText], Field(min_length=1, max_length=1)] | Annotated[
        list[PromptIds], Field(min_length=1, max_length=1)
    ] = Field(description="one prompt: text or token ids (a list of one is accepted too)")
    logprobs: StrictInt | None = Field(None, **bounds("logprobs"))
    echo: StrictBool | None = False
    best_of: StrictInt | None = Field(None, ge=1, description="only n itself: no server-side ranking")
    suffix: str | None = Field(None, max_length=0, description="not supported: leave it out")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is not supported")
        return echo


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Messages
    max_completion_tokens: StrictInt | None = Field(None, **bounds("max_tokens"))
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, **bounds("logprobs"))
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: leave it out or send an empty list")
    tool_choice: Literal["none"] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if tools:
            raise ValueError("tools are not supported")
        return tools


class PromptTokensDetails(BaseModel):
    """Prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """Tokens of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One of the n outputs of a completion."""

    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion (object ``text_completion``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    """An alternative token and its logprob."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A chosen token, its logprob and the top alternatives."""

    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    """Chat logprobs."""

    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    """The reply."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    """One of the n outputs of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """A chat completion (object ``chat.completion``)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    """A served model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    context_length: int | None = None


class ModelList(BaseModel):
    """The served models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
