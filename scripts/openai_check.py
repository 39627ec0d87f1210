#!/usr/bin/env python3
"""Talks to a shoal node with the real `openai` client: lists models, completes with and
without streaming, and checks the error mapping. Prints one JSON line.

usage: openai_check.py BASE_URL MODEL [API_KEY]
"""
import json
import sys

import openai


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    key = sys.argv[3] if len(sys.argv) > 3 else "unused"
    c = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key=key, max_retries=0, timeout=60)
    models = [m.id for m in c.models.list().data]
    # Streamed first (a real generation), then the same request without streaming.
    chunks = []
    finish = None
    for ch in c.completions.create(model=model, prompt="37+45=", max_tokens=5, temperature=0, stream=True):
        chunks.append(ch.choices[0].text)
        finish = ch.choices[0].finish_reason or finish
    r = c.completions.create(model=model, prompt="37+45=", max_tokens=5, temperature=0)
    seeded = [
        c.completions.create(model=model, prompt="12+3=", max_tokens=6, temperature=0.9, seed=5).choices[0].text
        for _ in range(2)
    ]
    errors = {}
    try:
        c.completions.create(model="no-such-model", prompt="1+1=", max_tokens=1)
    except openai.NotFoundError as e:
        errors["unknown_model"] = e.status_code
    try:
        c.completions.create(model=model, prompt="1" * 200, max_tokens=1)
    except openai.BadRequestError as e:
        errors["too_long"] = e.status_code
    print(json.dumps({
        "models": models,
        "text": r.choices[0].text,
        "finish_reason": r.choices[0].finish_reason,
        "completion_tokens": r.usage.completion_tokens,
        "streamed": "".join(chunks),
        "stream_chunks": len([x for x in chunks if x]),
        "stream_finish": finish,
        "seeded": seeded,
        "errors": errors,
    }))


if __name__ == "__main__":
    main()
