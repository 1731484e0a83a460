"""A two-turn tool conversation with the official `openai` Python client against a running `ferrotune api`.

Turn one asks a question with `tools`: the answer must be a call (`finish_reason == "tool_calls"`), the same
streamed (deltas) and not; turn two sends the call and the tool's result back (`role: "tool"`): the answer must be
text that uses the result. The server must serve a model that calls the tool, e.g. the tiny checkpoint trained on
tests/fixtures/tool_calls (LLaMA-Factory's sharegpt rows with a `tools` column, `function_call` and `observation`
turns):

    ferrotune train tools/tool_calls_train.yaml          # writes saves/tiny-tool-calls in a few seconds
    ferrotune api --model_name_or_path tests/fixtures/tiny-qwen3_5 \
        --adapter_name_or_path saves/tiny-tool-calls --port 8000
    tools/golden/.venv/bin/python tools/openai_tools_check.py --base-url http://127.0.0.1:8000/v1

(the client is pinned in tools/golden/requirements.txt). Exits non-zero when a check fails.
"""

import argparse
import json
import sys

import openai
from openai import OpenAI

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
# What the tool returns, and the answer the trained model gives with it.
RESULTS = {
    "Paris": ('{"temperature": 21, "sky": "sunny"}', "It is sunny in Paris, 21 degrees."),
    "Oslo": ('{"temperature": 4, "sky": "snowing"}', "It is snowing in Oslo, 4 degrees."),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    print("openai", openai.__version__)
    model = client.models.list().data[0].id
    ok = True
    for city, (result, answer) in RESULTS.items():
        messages = [{"role": "user", "content": f"What is the weather in {city}?"}]
        r = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], temperature=0)
        choice = r.choices[0]
        calls = choice.message.tool_calls or []
        print(f"{city}, turn one: finish_reason={choice.finish_reason} tool_calls="
              f"{[(c.function.name, c.function.arguments) for c in calls]}")
        good = (choice.finish_reason == "tool_calls" and len(calls) == 1 and calls[0].type == "function"
                and calls[0].function.name == "get_weather"
                and json.loads(calls[0].function.arguments) == {"city": city} and calls[0].id.startswith("call_"))
        ok &= good

        # Streamed: the client assembles the tool-call deltas.
        stream = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], temperature=0,
                                                stream=True)
        streamed, finish = {}, None
        for chunk in stream:
            for c in chunk.choices:
                for d in c.delta.tool_calls or []:
                    s = streamed.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    s["id"] = d.id or s["id"]
                    s["name"] += (d.function.name or "") if d.function else ""
                    s["arguments"] += (d.function.arguments or "") if d.function else ""
                finish = c.finish_reason or finish
        same = (finish == "tool_calls" and len(streamed) == 1 and streamed[0]["name"] == "get_weather"
                and json.loads(streamed[0]["arguments"]) == {"city": city})
        print(f"{city}, turn one streamed: finish_reason={finish} calls={list(streamed.values())} same={same}")
        ok &= same
        if not good:
            continue

        # Turn two: the assistant's call (as the client returned it) and the tool's result.
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": result},
        ]
        r = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], temperature=0)
        choice = r.choices[0]
        print(f"{city}, turn two: finish_reason={choice.finish_reason} content={choice.message.content!r}")
        ok &= choice.finish_reason == "stop" and choice.message.content == answer and not choice.message.tool_calls

    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
