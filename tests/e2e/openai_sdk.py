"""Drives fallback-cache-proxy with the official `openai` Python SDK, as a user would.

    python openai_sdk.py BASE_URL chat|stream PROMPT

Makes one chat completion (streamed with `stream`) through BASE_URL and prints one JSON
object on stdout, for the Rust test that runs it to compare:

    {"ok": true, "cache": "MISS", "reason": null, "completion": {...}}         # chat
    {"ok": true, "cache": "MISS", "reason": null, "chunks": [{...}, ...]}      # stream
    {"ok": false, "cache": "MISS", "reason": "insufficient_quota",
     "error": {"class": "RateLimitError", "status": 429, "code": ..., "type": ..., "body": ...}}

The key comes from OPENAI_API_KEY. The SDK does not retry, so that an error is seen as the
upstream sent it, unless SDK_MAX_RETRIES says how often it may (as users leave it: 2).
"""

import json
import os
import sys

import openai


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[2] not in ("chat", "stream"):
        print(__doc__, file=sys.stderr)
        return 2
    base_url, kind, prompt = sys.argv[1:]
    retries = int(os.environ.get("SDK_MAX_RETRIES", "0"))
    client = openai.OpenAI(base_url=base_url, max_retries=retries, timeout=60)
    request = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": prompt}],
    }
    try:
        if kind == "chat":
            raw = client.chat.completions.with_raw_response.create(**request)
            completion = raw.parse()
            assert isinstance(completion, openai.types.chat.ChatCompletion)
            out = {"completion": completion.model_dump(mode="json")}
        else:
            raw = client.chat.completions.with_raw_response.create(**request, stream=True)
            chunks = []
            for chunk in raw.parse():
                assert isinstance(chunk, openai.types.chat.ChatCompletionChunk)
                chunks.append(chunk.model_dump(mode="json"))
            out = {"chunks": chunks}
        headers = raw.headers
        out.update(ok=True)
    except openai.APIStatusError as error:
        headers = error.response.headers
        out = {
            "ok": False,
            "error": {
                "class": type(error).__name__,
                "status": error.status_code,
                "code": error.code,
                "type": error.type,
                "body": error.body,
            },
        }
    out["cache"] = headers.get("x-fallback-cache")
    out["reason"] = headers.get("x-fallback-cache-reason")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
