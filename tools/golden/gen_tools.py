"""Reference chat-template renderings of conversations with tools, for the tiny checkpoint.

The request's tools are shared by every case. For each conversation: the input (messages, tools, add_generation_prompt, enable_thinking) and the text
transformers' tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) writes with the checkpoint's
own template, with its token ids. A conversation the template rejects records the error instead; for
assistant tool calls whose arguments are a JSON string (as OpenAI clients send them), `parsed_text` is the
rendering once each string is parsed into an object (what a server must do before rendering).

The tiny checkpoint ships tools/golden/qwen3_5_chat_template.jinja unchanged (asserted below), so these goldens
cover the Qwen3.5 template itself.

Run: tools/golden/.venv/bin/python tools/golden/gen_tools.py
"""

import copy
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "tools.json")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.\nSay \"now\" for the present; temperatures in °C.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the documentation.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "default": 10},
                "threshold": {"type": "number", "default": 1e-05, "maximum": 1e16},
                "exact": {"type": "boolean"},
                "filters": {"type": "object", "properties": {"lang": {"type": "string"}}},
                "tags": {"type": "array", "items": {"type": "string"}},
                "cursor": {"type": ["string", "null"]},
            },
            "required": ["query"],
        },
    },
}

TOOLS = [WEATHER, SEARCH]
IMG = {"type": "image"}


def call(id_, name, args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


def as_string_args(messages):
    """The same conversation with every tool call's arguments as a JSON string, as OpenAI clients send it."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls", []):
            f = c.get("function", c)
            f["arguments"] = json.dumps(f["arguments"], ensure_ascii=False)
    return out


def parse_string_args(messages):
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls", []):
            f = c.get("function", c)
            if isinstance(f["arguments"], str):
                f["arguments"] = json.loads(f["arguments"])
    return out


WEATHER_CALL = [
    {"role": "user", "content": "What's the weather in Paris for 3 days?"},
    {"role": "assistant", "content": "", "tool_calls": [call("call_1", "get_weather", {"city": "Paris", "days": 3})]},
]

# Every schema type, multi-line and unicode strings, nested JSON, and an argument the schema does not declare.
ALL_TYPES_CALL = [
    {"role": "user", "content": "Find the install docs."},
    {"role": "assistant", "content": "I'll search the docs.", "tool_calls": [call("call_a", "search_docs", {
        "query": "install\n  on Linux\n\n(step 2) \"quoted\" ünïcödé 安装",
        "limit": 5,
        "threshold": 0.25,
        "exact": True,
        "filters": {"lang": "en", "nested": {"depth": [1, 2, {"x": None}]}, "ok": False},
        "tags": ["setup", "linux", "中文"],
        "cursor": None,
        "extra_note": {"undeclared": [1.5, "two"]},
    })]},
]

# Python's str() of floats, booleans and None (how the template writes a non-mapping argument), and json.dumps
# of floats inside a nested one.
FLOATS_CALL = [
    {"role": "user", "content": "Search with odd numbers."},
    {"role": "assistant", "content": "", "tool_calls": [call("call_f", "search_docs", {
        "query": "floats",
        "threshold": 1e-05,
        "exact": False,
        "cursor": None,
        "big": 1e16,
        "sum": 0.1 + 0.2,
        "negative_zero": -0.0,
        "plain": 123456789.125,
        "nested": {"f": [1e-07, 2.5e+20, 1.0, -0.0, 0.0001]},
    })]},
]

TWO_RESULTS = [
    {"role": "user", "content": "Weather in Paris and in Tokyo?"},
    # OpenAI clients send null content beside tool calls, and tool results as text parts.
    {"role": "assistant", "content": None, "tool_calls": [
        call("call_p", "get_weather", {"city": "Paris"}),
        call("call_t", "get_weather", {"city": "Tokyo", "unit": "celsius"}),
    ]},
    {"role": "tool", "tool_call_id": "call_p", "content": "{\"temp\": 18, \"sky\": \"cloudy\"}"},
    {"role": "tool", "tool_call_id": "call_t", "content": [{"type": "text", "text": "{\"temp\": 24, \"sky\": \"sunny\"}"}]},
]

MULTI_TURN = [
    {"role": "system", "content": "You are a travel assistant."},
    {"role": "user", "content": "Weather in Oslo?"},
    # A tool call without the OpenAI "function" wrapper: the template accepts both shapes.
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
    {"role": "tool", "tool_call_id": "call_o", "content": "Snow, -3 °C"},
    {"role": "assistant", "content": "It is snowing in Oslo (-3 °C)."},
    {"role": "user", "content": "And search the docs for packing lists, 2 results."},
    {"role": "assistant", "content": "<think>\nThe user wants docs.\n</think>\n\nSearching.", "tool_calls": [
        call("call_s", "search_docs", {"query": "packing list", "limit": 2}),
    ]},
    {"role": "tool", "tool_call_id": "call_s", "content": "1. Winter packing\n2. Ski trips"},
]

CASES = [
    dict(name="tools_question_thinking", gen=True, thinking=True,
         messages=[{"role": "user", "content": "What's the weather in Paris?"}]),
    dict(name="tools_question_no_thinking", gen=True, thinking=False,
         messages=[{"role": "user", "content": "What's the weather in Paris?"}]),
    dict(name="tools_question_default", gen=True, thinking=None,
         messages=[{"role": "user", "content": "Hello"}]),
    dict(name="assistant_tool_call", gen=False, thinking=None, messages=WEATHER_CALL),
    dict(name="assistant_tool_call_all_types", gen=False, thinking=None, messages=ALL_TYPES_CALL),
    dict(name="assistant_tool_call_floats", gen=False, thinking=None, messages=FLOATS_CALL),
    dict(name="assistant_tool_call_string_arguments", gen=False, thinking=None,
         messages=as_string_args(ALL_TYPES_CALL)),
    dict(name="two_tool_results", gen=True, thinking=None, messages=TWO_RESULTS),
    dict(name="two_tool_results_string_arguments", gen=True, thinking=False, messages=as_string_args(TWO_RESULTS)),
    dict(name="multi_turn_ending_in_tool_result", gen=True, thinking=True, messages=MULTI_TURN),
    dict(name="image_with_tools", gen=True, thinking=False,
         messages=[{"role": "user", "content": [IMG, {"type": "text", "text": "Where is this? Check its weather."}]}]),
    dict(name="system_with_tools", gen=True, thinking=None,
         messages=[{"role": "system", "content": "Answer in French.\n"},
                   {"role": "user", "content": "Météo à Lyon ?"}]),
    dict(name="system_parts_with_tools", gen=True, thinking=False,
         messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                   {"role": "user", "content": "Weather?"}]),
]


def main():
    from transformers import AutoProcessor, AutoTokenizer

    with open(os.path.join(CKPT, "chat_template.jinja")) as f, \
            open(os.path.join(HERE, "qwen3_5_chat_template.jinja")) as g:
        assert f.read() == g.read(), "the tiny checkpoint's template differs from the Qwen3.5 one"

    tok = AutoTokenizer.from_pretrained(CKPT)
    processor = AutoProcessor.from_pretrained(CKPT)
    out = []
    for case in CASES:
        kwargs = {"add_generation_prompt": case["gen"]}
        if case["thinking"] is not None:
            kwargs["enable_thinking"] = case["thinking"]
        entry = {"name": case["name"], "messages": case["messages"], "add_generation_prompt": case["gen"],
                 "enable_thinking": case["thinking"]}
        try:
            text = tok.apply_chat_template(case["messages"], tools=TOOLS, tokenize=False, **kwargs)
        except Exception as e:  # the template's own rejection is the reference here
            entry["error"] = f"{type(e).__name__}: {e}"
            parsed = parse_string_args(case["messages"])
            entry["parsed_text"] = tok.apply_chat_template(parsed, tools=TOOLS, tokenize=False, **kwargs)
            print(case["name"], "error:", entry["error"])
        else:
            # The processor (what serves images) renders the same text.
            assert text == processor.apply_chat_template(case["messages"], tools=TOOLS, tokenize=False, **kwargs)
            entry["text"] = text
            entry["input_ids"] = tok(text)["input_ids"]
            print(case["name"], len(entry["input_ids"]))
        out.append(entry)
    text = json.dumps({"tools": TOOLS, "cases": out}, indent=1, ensure_ascii=False)
    # Token id lists on one line each, to keep the fixture small.
    text = re.sub(r"\[\n\s*(\d+(?:,\n\s*\d+)*)\n\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(OUT, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
