"""Drives fallback-cache-proxy with the official `openai` and `anthropic` Python SDKs.

    python sdks.py BASE_URL SPEC

SPEC is JSON: {"sdk": "openai" | "anthropic", "client": "sync" | "async",
"api": "chat" | "responses" | "messages", "stream": true | false, "prompts": [...]}.
Makes one call per prompt, as a user would (a streamed call is read with the SDK's own
iterator, which may stop reading at the closing event), and prints one JSON list on stdout,
one object per call:

    {"ok": true, "cache": "MISS", "reason": null, "output": ...}
    {"ok": false, "cache": "MISS", "reason": "insufficient_quota",
     "error": {"class": "RateLimitError", "status": 429}}

`output` is the parsed answer (`model_dump`), or for a stream the list of its chunks or
events, and with `messages.stream()` the final message too. The SDKs do not retry.
"""

import asyncio
import json
import sys

import anthropic
import openai


def dump(value):
    return value.model_dump(mode="json")


def openai_sync(base_url, api, stream, prompt):
    client = openai.OpenAI(base_url=base_url, max_retries=0, timeout=60)
    if api == "chat":
        create = client.chat.completions.with_raw_response.create
        request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    else:
        create = client.responses.with_raw_response.create
        request = {"model": "gpt-4o-mini", "input": prompt}
    if stream:
        raw = create(**request, stream=True)
        # The SDK's iterator: for chat it stops reading at `data: [DONE]` and closes.
        return raw.headers, [dump(item) for item in raw.parse()]
    raw = create(**request)
    return raw.headers, dump(raw.parse())


async def openai_async(base_url, api, stream, prompt):
    client = openai.AsyncOpenAI(base_url=base_url, max_retries=0, timeout=60)
    if api == "chat":
        create = client.chat.completions.with_raw_response.create
        request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    else:
        create = client.responses.with_raw_response.create
        request = {"model": "gpt-4o-mini", "input": prompt}
    try:
        if stream:
            raw = await create(**request, stream=True)
            # `with_raw_response` is the legacy raw response: `parse()` is not awaited.
            items = [dump(item) async for item in raw.parse()]
            return raw.headers, items
        raw = await create(**request)
        return raw.headers, dump(raw.parse())
    finally:
        await client.close()


def anthropic_sync(base_url, stream, prompt):
    client = anthropic.Anthropic(base_url=base_url, max_retries=0, timeout=60)
    request = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        with client.messages.stream(**request) as events:
            items = [dump(event) for event in events]
            final = dump(events.get_final_message())
            return events.response.headers, {"events": items, "final": final}
    raw = client.messages.with_raw_response.create(**request)
    return raw.headers, dump(raw.parse())


def call(base_url, spec, prompt):
    sdk, api, stream = spec["sdk"], spec["api"], spec["stream"]
    try:
        if sdk == "anthropic":
            headers, output = anthropic_sync(base_url, stream, prompt)
        elif spec["client"] == "async":
            headers, output = asyncio.run(openai_async(base_url, api, stream, prompt))
        else:
            headers, output = openai_sync(base_url, api, stream, prompt)
        out = {"ok": True, "output": output}
    except (openai.APIStatusError, anthropic.APIStatusError) as error:
        headers = error.response.headers
        out = {"ok": False, "error": {"class": type(error).__name__, "status": error.status_code}}
    except (openai.APIError, anthropic.APIError, RuntimeError) as error:
        return {"ok": False, "cache": None, "reason": None,
                "error": {"class": type(error).__name__, "message": str(error)}}
    out["cache"] = headers.get("x-fallback-cache")
    out["reason"] = headers.get("x-fallback-cache-reason")
    return out


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    base_url, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps([call(base_url, spec, prompt) for prompt in spec["prompts"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
