"""Load test of `ferrotune api`: concurrent streaming clients with images, every answer checked.

Starts `ferrotune api` on a checkpoint (loopback only), asks each prompt once alone (greedy, streamed) for its
reference answer and the single-stream speed, then runs 1, 4, 8 and 16 concurrent streaming clients (each sends
--requests requests one after another) and prints, per level: aggregate completion tokens/s, its ratio to one
stream (the single client's level, or the references' median without it), time to first token p50 / p99, errors, and answers that differ from their reference (lost or truncated
tokens show up there). Bounded: a fixed number of requests and --time-limit seconds per level. The client's time to
first token is the first text it receives (a model that starts with text the server holds back, an incomplete
UTF-8 sequence of a random-init model for one, delays it); the server's, from its /metrics histogram, is the
first token.

Standard library only. A random-init checkpoint of a bench preset is written by the bench command:

    cargo build --release
    target/release/ferrotune bench decode --preset 135m --steps 1     # writes target/bench-models/qwen3_5-135m
    python3 tools/loadtest.py --model target/bench-models/qwen3_5-135m

Exits non-zero when a request fails or an answer differs from its reference.
"""

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(side, seed):
    """An RGB PNG of side × side pixels: a gradient that differs per seed (no imaging library needed)."""
    rows = []
    for y in range(side):
        row = bytearray([0])
        for x in range(side):
            row += bytes(((x * 3 + seed * 41) % 256, (y * 5 + seed * 17) % 256, ((x ^ y) + seed * 7) % 256))
        rows.append(bytes(row))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(
        b"IEND", b""
    )


def prompts(n, side):
    out = []
    for i in range(n):
        url = "data:image/png;base64," + base64.b64encode(png(side, i)).decode()
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": f"Describe robot {i}: its arms, its head and what it holds."},
        ]
        out.append([{"role": "user", "content": content}])
    return out


def stream_chat(port, messages, max_tokens, timeout):
    """One streamed greedy chat completion. Returns (text, completion tokens, seconds to first token, seconds)."""
    body = json.dumps(
        {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    text, tokens, first, finish = [], None, None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"error event: {event['error']}")
        for choice in event.get("choices", []):
            delta = choice.get("delta", {})
            piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
            if piece and first is None:
                first = time.perf_counter() - t0
            text.append(piece)
            finish = choice.get("finish_reason") or finish
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    total = time.perf_counter() - t0
    if tokens is None or finish is None:
        raise RuntimeError("the stream ended without its final chunk or usage")
    return "".join(text), tokens, first if first is not None else total, total


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def metrics(port):
    """The server's Prometheus counters as {name{labels}: value}."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    out = {}
    for line in c.getresponse().read().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def peak_rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder served by ferrotune api")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "ferrotune"))
    ap.add_argument("--clients", default="1,4,8,16", help="concurrency levels, comma-separated")
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (each with its own image)")
    ap.add_argument("--image-side", type=int, default=224)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=900, help="seconds per concurrency level")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for ferrotune api")
    args = ap.parse_args()

    levels = [int(c) for c in args.clients.split(",")]
    if max(levels) * args.requests > 1000:
        sys.exit("at most 1000 requests per level")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [args.binary, "api", "--model_name_or_path", args.model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-num-seqs", str(max(16, max(levels)))] + args.server_arg
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()
    failed = False
    try:
        t = time.time()
        while True:
            if server.poll() is not None:
                sys.exit("ferrotune api exited:\n" + "".join(log))
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() - t > 300:
                sys.exit("the server did not start within 300 s")
            time.sleep(0.2)
        msgs = prompts(args.prompts, args.image_side)
        # References: each prompt alone.
        refs, alone_rates, alone_ttft = [], [], []
        for m in msgs:
            text, tokens, first, total = stream_chat(port, m, args.max_tokens, args.time_limit)
            refs.append((text, tokens))
            alone_rates.append(tokens / total)
            alone_ttft.append(first)
        one_stream = statistics.median(alone_rates)
        print(f"model: {args.model}; {args.prompts} prompts with a {args.image_side}² image, {args.max_tokens} tokens")
        print(f"one stream alone: {one_stream:.1f} tok/s (median), time to first token {statistics.median(alone_ttft):.2f} s")
        print()
        print(
            "| clients | requests | aggregate tok/s | × one stream | TTFT p50 | TTFT p99 | errors | differing answers "
            "| server TTFT mean / p99 | mean batch | prefill / decode time |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for level in levels:
            results, errors, lock = [], [], threading.Lock()
            deadline = time.time() + args.time_limit

            def client(c):
                for r in range(args.requests):
                    if time.time() > deadline:
                        with lock:
                            errors.append("time limit")
                        return
                    k = (c * args.requests + r) % len(msgs)
                    try:
                        out = stream_chat(port, msgs[k], args.max_tokens, args.time_limit)
                        with lock:
                            results.append((k, out))
                    except Exception as e:  # a failed request is counted, not fatal
                        with lock:
                            errors.append(repr(e))

            before = metrics(port)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(level)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            tokens = sum(out[1] for _, out in results)
            differ = sum(1 for k, out in results if (out[0], out[1]) != refs[k])
            ttfts = [out[2] for _, out in results] or [float("nan")]
            rate = tokens / wall
            if level == 1:
                one_stream = rate  # the ratios compare with the single client's run where there is one
            after = metrics(port)
            d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            batch = d.get("ferrotune_decode_rows_total", 0) / max(1, d.get("ferrotune_decode_steps_total", 0))
            n_ttft = d.get("ferrotune_time_to_first_token_seconds_count", 0)
            mean_ttft = d.get("ferrotune_time_to_first_token_seconds_sum", 0) / max(1, n_ttft)
            # The server's histogram bucket that holds the 99th percentile (its upper bound).
            buckets = sorted(
                (float(k.split('le="')[1].rstrip('"}')), v)
                for k, v in d.items()
                if k.startswith("ferrotune_time_to_first_token_seconds_bucket") and "+Inf" not in k
            )
            p99 = next((le for le, c in buckets if c >= 0.99 * n_ttft), float("inf"))
            pre = d.get('ferrotune_batch_seconds_total{phase="prefill"}', 0)
            dec = d.get('ferrotune_batch_seconds_total{phase="decode"}', 0)
            print(
                f"| {level} | {len(results) + len(errors)} | {rate:.1f} | {rate / one_stream:.2f}× | "
                f"{percentile(ttfts, 0.5):.2f} s | {percentile(ttfts, 0.99):.2f} s | {len(errors)} | {differ} | "
                f"{mean_ttft:.2f} s / ≤ {p99:g} s | {batch:.1f} | {pre:.1f} s / {dec:.1f} s |",
                flush=True,
            )
            for e in errors[:3]:
                print(f"  error: {e}", file=sys.stderr)
            failed |= bool(errors) or differ > 0
        peak = peak_rss(server.pid)
        if peak:
            print(f"\nserver peak RSS: {peak / 1e9:.2f} GB")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
