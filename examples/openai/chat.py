"""Talk to the mesh with the official OpenAI Python SDK: one answer, then one streamed answer.

    make run            # in another terminal; the banner prints the variables below
    export OPENAI_BASE_URL=https://127.0.0.1:8443/v1 OPENAI_API_KEY=<demo key> SSL_CERT_FILE=.autoglm/certs/ca.pem
    .venv/bin/python examples/openai/chat.py "Write a haiku about the sea."

Without the variables it reads the local mesh's `.autoglm/endpoint.json`, demo key and CA itself.
Extensions go through `extra_body` (tags, context_id, cache_policy); `usage.cost` says what it cost.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from pathlib import Path

import httpx
from openai import OpenAI

MODEL = "smollm2-135m-instruct"


def client(data_dir: Path = Path(".autoglm")) -> OpenAI:
    base_url, key = os.environ.get("OPENAI_BASE_URL"), os.environ.get("OPENAI_API_KEY")
    ca = os.environ.get("SSL_CERT_FILE", "")
    endpoint = data_dir / "endpoint.json"
    if not base_url and endpoint.exists():
        doc = json.loads(endpoint.read_text())
        base_url = doc["openai_base_url"]
        ca = doc["ca_cert"]
    if not key and (data_dir / "demo_api_key").exists():
        key = (data_dir / "demo_api_key").read_text().strip()
    if not base_url or not key:
        raise SystemExit("set OPENAI_BASE_URL and OPENAI_API_KEY (the `make run` banner prints both)")
    verify = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    return OpenAI(base_url=base_url, api_key=key, http_client=httpx.Client(verify=verify))


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Write a haiku about the sea."
    openai = client()
    answer = openai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0.2,
        extra_body={"tags": {"example": "openai-chat"}},
    )
    print(answer.choices[0].message.content)
    usage = answer.usage
    assert usage is not None
    cost = (usage.model_extra or {}).get("cost", {})
    print(f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
          f"{cost.get('micros', 0)} micro-{cost.get('currency', 'USD')}]", file=sys.stderr)

    stream = openai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=64, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            print(f"\n[streamed: {chunk.usage.completion_tokens} completion tokens]", file=sys.stderr)


if __name__ == "__main__":
    main()
