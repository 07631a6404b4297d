"""Request bodies of the OpenAI API subset we serve (pydantic). Unknown fields are ignored, as
OpenAI clients send many we have no use for; fields whose meaning we cannot honour (n > 1, tools,
non-text content) are refused with a 400 rather than silently dropped."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # as OpenAI
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs (generate.sampling.MAX_LOGPROBS)
_UNSUPPORTED = {"tools": "tools are not supported"}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31 - 1)  # not in OpenAI's API; vLLM-style extension
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v

    # Fields a request may carry but we cannot honour: refused when set to anything truthy.
    # check_fields=False: `tools` is declared by a subclass.
    @field_validator(*_UNSUPPORTED, check_fields=False)
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(_UNSUPPORTED[info.field_name])
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default; 0 only with echo (scoring a text)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool = False  # vLLM's: legacy logprobs keyed "token_id:N"

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and (not v or (isinstance(v[0], str) and len(v) != 1)):
            raise ValueError("prompt must be a string, one string in a list, or a list of token ids")
        return v

    def limit(self) -> Optional[int]:
        return self.max_tokens
