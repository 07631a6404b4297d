"""The FastAPI app: /v1/chat/completions, /v1/completions (both with SSE streaming), /v1/models,
/health.

Every error is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for bad
JSON, missing or invalid fields, a prompt that leaves no room in the context or a max_tokens
that does not fit; 401 for a missing or wrong bearer token (when an API key is set); 404 for an
unknown model or path; 405 for a wrong method. A 500 would mean a bug of ours, never bad input.

Log-probabilities, in OpenAI's shapes: chat `logprobs: true` (+ `top_logprobs` 0-20) gives
`choices[0].logprobs.content`, a list of {token, logprob, bytes, top_logprobs}; completions
`logprobs: n` gives {tokens, token_logprobs, top_logprobs, text_offset}, and with `echo` the
prompt's too (its first token has none). They are the model's raw log-softmax, before
temperature / top-k / top-p (vLLM's default). Streamed, each chunk carries its tokens' entries.

Under load (vLLM's behaviour): requests are decoded by continuous batching (`serving.continuous`;
`scheduler="batch"` is the older one-batch-at-a-time `serving.batcher`); a client that disconnects,
streaming or not, has its request cancelled (its row freed at the next decode call); when
`max_queue` requests already wait, a new one gets 429 with a Retry-After header; with `warmup`,
/health answers 503 until the compiles are done.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imitation_jax.serving.batcher import Batcher, Delta, Done, PromptLogprobs, QueueFull
from imitation_jax.serving.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("imitation_jax.serving")
DEFAULT_MAX_TOKENS = 512  # chat requests without max_tokens: this much, or what the context leaves


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: Optional[str] = None, code: Optional[str] = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    where = ".".join(loc) or "body"
    return error_response(400, f"{where}: {first.get('msg', 'invalid value')}", param=where or None,
                          code="missing_field" if first.get("type") == "missing" else "invalid_value")


SCHEDULERS = ("continuous", "batch")


def create_app(generator, model_name: str, *, api_key: Optional[str] = None, max_batch: int = 8,
               batch_wait_ms: float = 5.0, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               scheduler: str = "continuous", max_queue: int = 256, warmup: str = "none") -> FastAPI:
    """An app serving `generator` (a `Generator`; `scheduler="batch"` takes anything with its
    `generate`/`encode_chat`/`max_len`/`tokenizer`) as model `model_name`. `max_batch`: requests
    decoded together; `max_queue`: requests waiting beyond them before 429s; `warmup`: "basic" or
    "full" compiles those shapes before /health reports ready (`SlotEngine.warm_up_tasks`;
    continuous only), "none" leaves every shape to its first use."""
    from imitation_jax.generate import SamplingParams
    from imitation_jax.generate.text import TokenStrings
    from imitation_jax.serving.continuous import ContinuousScheduler

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    strings = TokenStrings(generator.tokenizer)
    if scheduler == "continuous":
        batcher = ContinuousScheduler(generator, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000,
                                      max_queue=max_queue, warmup=warmup)
    else:
        batcher = Batcher(generator, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000, max_queue=max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="imitation-jax", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=kind, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error")
        return error_response(500, "internal server error", type="server_error")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send it as 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{model_name}'",
                           param="model", code="model_not_found")

    def sampling(req, prompt: list[int], default: int, logprobs=None, prompt_logprobs=None) -> Any:
        room = generator.max_len - len(prompt)
        limit = req.limit()
        if room < (0 if limit == 0 else 1):
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is "
                           f"{generator.max_len} tokens", param="messages", code="context_length_exceeded")
        if limit is not None and limit > room:
            raise APIError(400, f"max_tokens={limit} does not fit: the prompt has {len(prompt)} tokens and "
                           f"the context is {generator.max_len}, leaving {room}", param="max_tokens",
                           code="context_length_exceeded")
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        return SamplingParams(max_new_tokens=limit if limit is not None else min(room, default),
                              temperature=req.temperature, top_p=req.top_p,
                              top_k=min(req.top_k, generator.tokenizer.vocab_size),
                              stop=req.stops(), seed=seed % (1 << 32), logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)

    def submit(prompt: list[int], params, stream: bool):
        try:
            return app.state.batcher.submit(prompt, params, stream=stream)
        except QueueFull as exc:
            raise APIError(429, str(exc), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None

    def usage(prompt: list[int], completion) -> dict:
        n = len(completion.tokens)
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    async def finish(request, http: Request) -> Any:
        """The completion; None if the client went away first (the request is then cancelled)."""
        async def result():
            while True:
                item = await request.events.get()
                if isinstance(item, Done):
                    return item.completion
                if isinstance(item, BaseException):
                    raise item

        done, gone = asyncio.ensure_future(result()), asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():
                request.cancelled = True
                done.cancel()
        return done.result() if not done.cancelled() else None

    def stream(request, prompt, chunk, include_usage: bool):
        """SSE events: chunk(delta_text, finish, first=False, logprobs=[], prompt=None) builds one
        event body (`logprobs`: the generated tokens' entries in it; `prompt`: the prompt's, echo)."""
        async def events():
            try:
                yield _sse(chunk(None, None, first=True))
                sent = 0
                while True:
                    item = await request.events.get()
                    if isinstance(item, Delta):
                        sent += len(item.logprobs)
                        yield _sse(chunk(item.text, None, logprobs=item.logprobs))
                    elif isinstance(item, PromptLogprobs):
                        yield _sse(chunk(None, None, prompt=item.entries))
                    elif isinstance(item, Done):
                        yield _sse(chunk(None, item.completion.finish_reason,
                                         logprobs=(item.completion.logprobs or [])[sent:]))
                        if include_usage:
                            yield _sse({**chunk(None, None), "choices": [], "usage": usage(prompt, item.completion)})
                        break
                    else:  # generation failed after the 200 was sent: report in-band, as OpenAI does
                        yield _sse({"error": {"message": "generation failed", "type": "server_error",
                                              "param": None, "code": None}})
                        break
                yield "data: [DONE]\n\n"
            finally:
                request.cancelled = True  # a client that left stops receiving
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        body = {"status": "ok" if batcher.ready else "warming up", "model": model_name, **batcher.health()}
        return JSONResponse(body, status_code=200 if batcher.ready else 503)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "imitation-jax"}]}

    @app.get("/v1/models/{name}", dependencies=[Depends(check_key)])
    async def model(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "imitation-jax"}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatCompletionRequest, http: Request):
        check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt = generator.encode_chat(messages)
        except ValueError as exc:  # e.g. a system message that is not first
            raise APIError(400, f"messages: {exc}", param="messages") from None
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs to be true", param="top_logprobs")
        params = sampling(req, prompt, default_max_tokens,
                          logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        request = submit(prompt, params, req.stream)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        fmt = LogprobFormatter(strings)
        if req.stream:
            def chunk(delta, finish, first=False, logprobs=(), prompt=None):
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                lp = {"content": fmt.chat(logprobs)} if req.logprobs and not first else None
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": 0, "delta": d, "logprobs": lp, "finish_reason": finish}]}
            return stream(request, prompt, chunk, bool(req.stream_options and req.stream_options.include_usage))
        completion = await finish(request, http)
        if completion is None:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        lp = {"content": fmt.chat(completion.logprobs), "refusal": None} if req.logprobs else None
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "logprobs": lp, "finish_reason": completion.finish_reason}],
                "usage": usage(prompt, completion)}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, http: Request):
        check_model(req.model)
        tok = generator.tokenizer
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            if any(not 0 <= t < tok.vocab_size for t in req.prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {tok.vocab_size})", param="prompt")
            prompt = list(req.prompt)
        else:
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
        if not prompt:
            raise APIError(400, "prompt: empty", param="prompt")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 is only allowed with echo (to score the prompt)", param="max_tokens")
        scored = req.echo and req.logprobs is not None
        params = sampling(req, prompt, default_max_tokens, logprobs=req.logprobs,
                          prompt_logprobs=req.logprobs if scored else None)
        request = submit(prompt, params, req.stream)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoed = tok.decode(prompt) if req.echo else ""  # what the prompt's tokens' bytes add up to
        fmt = LogprobFormatter(strings, token_ids=req.return_tokens_as_token_ids)
        if req.stream:
            def chunk(delta, finish, first=False, logprobs=(), prompt=None):
                text, lp = delta or "", None
                if prompt is not None:  # the echo, with its log-probabilities
                    text, lp = echoed, fmt.legacy(prompt, prompt_ids=prompt_ids)
                    fmt.restart(len(echoed))
                elif first and req.echo and not scored:
                    text = echoed
                elif req.logprobs is not None and not first:
                    lp = fmt.legacy(logprobs)
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
            prompt_ids = prompt
            return stream(request, prompt, chunk, bool(req.stream_options and req.stream_options.include_usage))
        completion = await finish(request, http)
        if completion is None:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        lp = None
        if req.logprobs is not None:
            lp = fmt.legacy(completion.prompt_logprobs, prompt_ids=prompt) if scored else None
            fmt.restart(len(echoed))
            lp = _join_legacy(lp, fmt.legacy(completion.logprobs))
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": echoed + completion.text, "logprobs": lp,
                             "finish_reason": completion.finish_reason}],
                "usage": usage(prompt, completion)}

    return app


class LogprobFormatter:
    """Generate's `TokenLogprob`s of one sequence as OpenAI shows them, chunk by chunk. The first
    piece of the sequence loses its leading space where decoding drops it (so the tokens' bytes add
    up to the text), and the legacy `text_offset`s count characters from `offset`. `token_ids`
    (vLLM's `return_tokens_as_token_ids`): the legacy tokens and top_logprobs keys are "token_id:N",
    so ids that share a text (a piece and its byte-fallback piece) stay apart."""

    def __init__(self, strings, token_ids: bool = False):
        self.strings = strings
        self.token_ids = token_ids
        self.restart(0)

    def restart(self, offset: int) -> None:
        """A new sequence (the completion after an echoed prompt, decoded on its own) at `offset`."""
        self.offset = offset  # characters of text before the next token
        self._at_start = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _piece(self, token: int, at_start: bool):
        text, raw = self.strings(token)
        if at_start and raw is not None:
            raw, dropped = self.strings.tokenizer.first_token_bytes(token)
            if dropped:
                text = raw.decode("utf-8", errors="backslashreplace")
        return text, raw

    def _advance(self, token: int):
        """The token's (text, bytes) in the sequence; moves the text offset past it."""
        text, raw = self._piece(token, self._at_start)
        if raw is not None:
            self._at_start = False
            self.offset += len(self._utf8.decode(raw))
        return text, raw

    def chat(self, entries) -> list[dict]:
        out = []
        for e in entries or ():
            at_start = self._at_start
            text, raw = self._advance(e.token)
            top = []
            for t, lp in e.top:
                alt, alt_raw = self._piece(t, at_start)
                top.append({"token": alt, "logprob": lp, "bytes": _bytes(alt_raw)})
            out.append({"token": text, "logprob": e.logprob, "bytes": _bytes(raw), "top_logprobs": top})
        return out

    def legacy(self, entries, prompt_ids=None) -> dict:
        """{tokens, token_logprobs, top_logprobs, text_offset}; with `prompt_ids`, entries are a
        prompt's (the first None) and tokens come from the ids."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, e in enumerate(entries or ()):
            token = prompt_ids[i] if prompt_ids is not None else e.token
            at_start = self._at_start
            out["text_offset"].append(self.offset)
            text, _ = self._advance(token)
            out["tokens"].append(f"token_id:{token}" if self.token_ids else text)
            out["token_logprobs"].append(None if e is None else e.logprob)
            top = None
            if e is not None:
                top = {}
                for t, lp in e.top:
                    top.setdefault(f"token_id:{t}" if self.token_ids else self._piece(t, at_start)[0], lp)
            out["top_logprobs"].append(top)
        return out


def _bytes(raw) -> Optional[list[int]]:
    return None if raw is None else list(raw)


def _join_legacy(a: Optional[dict], b: dict) -> dict:
    return b if a is None else {k: a[k] + b[k] for k in b}


async def _disconnected(http: Request) -> None:
    """Returns once the client has closed the connection (the body has been read already, so the
    next ASGI message is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
