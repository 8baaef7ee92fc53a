"""Load generator for `gptq serve` (docs/serve.md, issue 17's benchmark): N concurrent streaming
clients (asyncio, the standard library only: it runs on the GPU machine, which has no PyPI) each
send requests of random token-id prompts and a fixed number of output tokens (ignore_eos), for a
concurrency sweep. Prints, per concurrency: output tok/s over the run, TTFT and time per output
token (TPOT) p50 / p99.

    gptq serve MODEL --port 8080 --max-seqs 64 &
    python3 bench/serve_load.py --url http://127.0.0.1:8080 --prompt 512 --gen 128 \
        --concurrency 1,8,32,64 --requests 2     # requests per client
"""
import argparse
import asyncio
import json
import random
import time
import urllib.parse
import urllib.request


class http_error(Exception):
    pass


async def sse_post(url, path, body, api_key):
    """POST a JSON body and yield each `data:` payload of the server-sent event stream, as it
    arrives (HTTP/1.1, chunked or not)."""
    u = urllib.parse.urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    data = json.dumps(body).encode()
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
                  f"Authorization: Bearer {api_key}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                  ).encode() + data)
    await writer.drain()
    status = (await reader.readline()).decode()
    headers = {}
    while True:
        line = (await reader.readline()).decode().strip()
        if not line:
            break
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if " 200 " not in status:
        raise http_error(status.strip() + " " + (await reader.read()).decode()[:300])
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    buf = b""
    try:
        while True:
            if chunked:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                piece = await reader.readexactly(size)
                await reader.readline()
            else:
                piece = await reader.read(65536)
                if not piece:
                    break
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: ") and line[6:] != b"[DONE]":
                        yield json.loads(line[6:])
    finally:
        writer.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def one(client, model, prompt, gen):
    t0 = time.perf_counter()
    times = []
    body = {"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    n_out = 0
    async for chunk in sse_post(client["url"], "/v1/completions", body, client["key"]):
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            times.append(time.perf_counter())
        if chunk.get("usage"):
            n_out = chunk["usage"]["completion_tokens"]
    ttft = times[0] - t0 if times else float("nan")
    tpot = (times[-1] - times[0]) / (n_out - 1) if n_out > 1 and times else float("nan")
    return ttft, tpot, n_out


async def sweep_point(args, client, model, conc, vocab, rng):
    async def worker():
        out = []
        for _ in range(args.requests):
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt)]
            out.append(await one(client, model, prompt, args.gen))
        return out
    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*[worker() for _ in range(conc)]) for r in rs]
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    tpot = [r[1] for r in results if r[1] == r[1]]
    n_out = sum(r[2] for r in results)
    return {"concurrency": conc, "requests": len(results), "output_tok_s": n_out / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tpot_p99_ms": 1e3 * pct(tpot, 99), "wall_s": wall}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (random ids)")
    ap.add_argument("--gen", type=int, default=128, help="output tokens per request")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--vocab", type=int, default=8192, help="random ids are drawn from [3, vocab)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    client = {"url": args.url, "key": args.api_key}
    req = urllib.request.Request(args.url + "/v1/models", headers={"Authorization": "Bearer " + args.api_key})
    model = json.loads(urllib.request.urlopen(req, timeout=60).read())["data"][0]["id"]
    rng = random.Random(args.seed)
    await one(client, model, [rng.randrange(3, args.vocab) for _ in range(16)], 4)  # warm-up
    rows = []
    for conc in [int(c) for c in args.concurrency.split(",")]:
        row = await sweep_point(args, client, model, conc, args.vocab, rng)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"concurrency {conc:3d}: {row['output_tok_s']:8.1f} output tok/s, TTFT p50 {row['ttft_p50_ms']:7.1f} "
                  f"ms p99 {row['ttft_p99_ms']:7.1f} ms, TPOT p50 {row['tpot_p50_ms']:6.2f} ms p99 "
                  f"{row['tpot_p99_ms']:6.2f} ms ({row['requests']} requests, {row['wall_s']:.1f} s)", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
