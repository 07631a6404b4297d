"""The study's crowd-rater analogue: a rule-based judge behind an OpenAI-compatible chat API that
prefers the answer carrying more of the teacher's style markers (ties when equal), whatever the
answer says. `imitation-jax judge` asks it exactly as it would ask a real judge model; it reads the
two answers from the pairwise prompt `imitation_jax.collect.judge.judge_messages` builds.

    python -m imitation_jax.study.judge_server --port 8001
"""

from __future__ import annotations

import argparse
import re
import time

from imitation_jax.study.style import marker_count

_ANSWER = re.compile(r"\[The start of assistant ([AB])'s answer\]\n(.*?)\n\[The end of assistant \1's answer\]", re.S)


def verdict(prompt: str) -> str:
    answers = dict(_ANSWER.findall(prompt))
    if set(answers) != {"A", "B"}:
        return "I cannot find both answers. [[C]]"
    a, b = marker_count(answers["A"]), marker_count(answers["B"])
    pick = "A" if a > b else "B" if b > a else "C"
    return f"Style markers: A has {a}, B has {b}. [[{pick}]]"


def create_app():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="study style judge")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "style-judge", "object": "model", "owned_by": "study"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        messages = body.get("messages") or []
        user = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "user")
        if not user:
            return JSONResponse(status_code=400, content={"error": {"message": "no user message",
                                                                    "type": "invalid_request_error"}})
        text = verdict(user)
        return {"id": f"judge-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "style-judge"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(text.split()),
                          "total_tokens": len(user.split()) + len(text.split())}}

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
