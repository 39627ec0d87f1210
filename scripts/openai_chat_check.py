#!/usr/bin/env python3
"""Talks to a shoal node's chat API with the real `openai` client: one chat completion
without streaming and the same one streamed, then both again with `logprobs=True,
top_logprobs=2` (read through the client's types: `choice.logprobs.content[i].logprob`,
`.token`, `.bytes`, `.top_logprobs`). Prints one JSON line.

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

    def entries(content):
        return [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top": [[t.token, t.logprob, t.bytes] for t in e.top_logprobs],
            }
            for e in content
        ]

    ask = dict(model=model, messages=messages, max_completion_tokens=12, temperature=0,
               logprobs=True, top_logprobs=2)
    # Streamed first: a live generation (the same request after it is a cache hit).
    streamed_lp, lp_text = [], []
    for ch in c.chat.completions.create(**ask, stream=True):
        if ch.choices[0].delta.content:
            lp_text.append(ch.choices[0].delta.content)
        if ch.choices[0].logprobs is not None and ch.choices[0].logprobs.content:
            streamed_lp.extend(entries(ch.choices[0].logprobs.content))
    lp = c.chat.completions.create(**ask)
    print(json.dumps({
        "content": r.choices[0].message.content,
        "role": r.choices[0].message.role,
        "finish_reason": r.choices[0].finish_reason,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "streamed": "".join(chunks),
        "stream_roles": roles,
        "stream_finish": finish,
        "logprobs_content": lp.choices[0].message.content,
        "logprobs": entries(lp.choices[0].logprobs.content),
        "streamed_logprobs_content": "".join(lp_text),
        "streamed_logprobs": streamed_lp,
    }))


if __name__ == "__main__":
    main()
