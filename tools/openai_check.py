"""Checks a running `ferrotune api` with the official `openai` Python client: one non-streaming and one streaming
chat completion, each with an image sent as a data URL, plus the model list and an error.

Start a server, then run this (the client is pinned in tools/golden/requirements.txt):

    ferrotune api --model_name_or_path tests/fixtures/tiny-qwen3_5 \
        --adapter_name_or_path tests/fixtures/golden/peft/adapter --api-key sk-local --port 8000
    tools/golden/.venv/bin/python tools/openai_check.py --base-url http://127.0.0.1:8000/v1 --api-key sk-local

Exits non-zero when a check fails.
"""

import argparse
import base64
import os
import sys
import time

import openai
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "tests", "fixtures", "golden", "model", "img_a.png")
QUESTION = "请识别并描述图片中的机器人及其特征"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=os.environ.get("API_KEY", "none"))
    ap.add_argument("--image", default=IMAGE)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    print("openai", openai.__version__)
    models = client.models.list()
    model = models.data[0].id
    print("models:", [m.id for m in models.data])

    with open(args.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": QUESTION},
    ]}]
    common = dict(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0,
                  # A repetition penalty keeps the tiny random test model from repeating one token.
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}, "repetition_penalty": 1.3})

    t = time.time()
    r = client.chat.completions.create(**common)
    choice = r.choices[0]
    print(f"non-streaming ({time.time() - t:.2f}s): id={r.id} finish_reason={choice.finish_reason} "
          f"usage={r.usage.prompt_tokens}+{r.usage.completion_tokens}")
    print("  content:", repr(choice.message.content))
    ok = choice.message.role == "assistant" and choice.finish_reason in ("stop", "length") and r.model == model

    t = time.time()
    stream = client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, n = [], None, None, 0
    for chunk in stream:
        n += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    text = "".join(pieces)
    print(f"streaming ({time.time() - t:.2f}s): {n} chunks, finish_reason={finish}, "
          f"usage={usage.prompt_tokens}+{usage.completion_tokens}" if usage else "no usage")
    print("  content:", repr(text))
    same = text == choice.message.content
    print("  streamed == non-streamed:", same)
    ok = ok and same and finish == choice.finish_reason and usage is not None

    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}])
        print("bad image: no error raised")
        ok = False
    except openai.BadRequestError as e:
        print("bad image -> BadRequestError", e.status_code, e.body.get("code") if isinstance(e.body, dict) else e.body)

    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
