"""`gptq serve --device cuda` smoke test on the GPU machine (no network there, so no openai
package: stdlib only). Starts the server on the bundled tiny-llama, checks a greedy completion
equals the CPU server's, a stream, a chat request, two concurrent requests, the metrics back to 0,
the plan line naming the GPU's shared KV page pool, and SIGTERM -> exit 0.

    python3 scripts/device/serve_smoke.py GPTQ_BINARY [MODEL]
"""
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request

GPTQ = sys.argv[1]
MODEL = sys.argv[2] if len(sys.argv) > 2 else "models/tiny-llama"
TEMPLATE = "tests/data/serve/chat_template.jinja"


plans = {}  # device -> the startup's "memory plan" line


def start(device):
    p = subprocess.Popen([GPTQ, "serve", MODEL, "--device", device, "--port", "0", "--ctx", "512",
                          "--chat-template", TEMPLATE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        print(f"[{device}] {line}", end="")
        if line.startswith("memory plan:"):
            plans[device] = line.strip()
        m = re.match(r"listening on (http://\S+)", line)
        if m:
            return p, m.group(1)
    raise RuntimeError(p.stderr.read())


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


def completion(url, prompt, n, **kw):
    return json.loads(post(url, "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0, **kw}))


def metrics(url):
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l and l[0] != "#"}


results = {}
cpu, cpu_url = start("cpu")
want = {p: completion(cpu_url, p, 32)["choices"][0]["text"] for p in ["Once upon a time", "The kernel"]}
cpu.send_signal(signal.SIGTERM)
results["cpu_exit"] = cpu.wait(timeout=60)

gpu, url = start("cuda")
ok = True
for p, w in want.items():
    got = completion(url, p, 32)
    text = got["choices"][0]["text"]
    same = text == w
    ok &= same
    results[f"greedy {p!r}"] = {"cuda": text, "cpu": w, "equal": same, "usage": got["usage"]}
stream = post(url, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0,
                                       "stream": True, "stream_options": {"include_usage": True}})
chunks = [json.loads(l[6:]) for l in stream.splitlines() if l.startswith("data: {")]
streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
results["stream_equal"] = streamed == want["Once upon a time"]
results["stream_done"] = stream.rstrip().endswith("data: [DONE]")
chat = json.loads(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}],
                                                       "max_tokens": 24, "temperature": 0}))
results["chat"] = chat["choices"][0]["message"]["content"]
outs = [None, None]


def run(i):
    outs[i] = completion(url, ["Once upon a time", "The kernel"][i], 32)["choices"][0]["text"]


threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
results["concurrent_equal"] = outs == [want["Once upon a time"], want["The kernel"]]
m = metrics(url)
results["pages_used_after"] = m["gptq_kv_pages_used"]
results["pages_reserved_after"] = m["gptq_kv_pages_reserved"]
results["pages_total"] = m["gptq_kv_pages_total"]
# The GPU's KV cache is a pool of pages shared by the slots (docs/serve.md "Memory plan").
results["paged_plan"] = "KV pool" in plans.get("cuda", "") and "shared by" in plans.get("cuda", "")
gpu.send_signal(signal.SIGTERM)
results["cuda_exit"] = gpu.wait(timeout=60)
results["cuda_stderr"] = gpu.stderr.read()[-2000:]
print(json.dumps(results, indent=1))
