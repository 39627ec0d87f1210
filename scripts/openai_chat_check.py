#!/usr/bin/env python3
"""Talks to a shoal node's chat API with the real `openai` client: one chat completion
without streaming and the same one streamed. Prints one JSON line.

usage: openai_chat_check.py BASE_URL MODEL MESSAGES_JSON
"""
import json
import sys

import openai


def main() -> None:
    base, model, messages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    c = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = c.chat.completions.create(model=model, messages=messages, max_completion_tokens=12, temperature=0)
    chunks, roles, finish = [], [], None
    for ch in c.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=12, temperature=0, stream=True
    ):
        d = ch.choices[0].delta
        if d.role:
            roles.append(d.role)
        if d.content:
            chunks.append(d.content)
        finish = ch.choices[0].finish_reason or finish
    print(json.dumps({
        "content": r.choices[0].message.content,
        "role": r.choices[0].message.role,
        "finish_reason": r.choices[0].finish_reason,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "streamed": "".join(chunks),
        "stream_roles": roles,
        "stream_finish": finish,
    }))


if __name__ == "__main__":
    main()
