"""`gptq serve` end to end with the official OpenAI Python client (docs/serve.md).

Run by tests/serve/run_openai_test.sh (CTest: serve_openai): starts the server on a free port
with the bundled tiny-llama, then checks completions, chat, streaming, stop strings, seeds,
logprobs, the error cases, 32 concurrent streaming clients (each greedy output equal to the same
request alone) and that the KV pages metric returns to 0; a second server checks the connection
limit (503 + Retry-After), slow clients, client disconnects and SIGTERM.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "tiny-llama")
TEMPLATE = os.path.join(ROOT, "tests", "data", "serve", "chat_template.jinja")
GPTQ = None
API_KEY = "test-key"
CTX = 512


class server:
    """A `gptq serve` process on a free port; the URL comes from its startup line."""

    def __init__(self, *extra):
        self.proc = subprocess.Popen([GPTQ, "serve", MODEL, "--port", "0", "--ctx", str(CTX), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.startup = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("gptq serve exited at startup: " + self.proc.stderr.read())
            self.startup.append(line)
            m = re.match(r"listening on (http://[0-9.]+:(\d+))", line)
            if m:
                self.url, self.port = m.group(1), int(m.group(2))
                return
        raise RuntimeError("no 'listening on' line within 60 s")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def metrics(self):
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def raw(self, path, body, headers=None, method="POST"):
        """(status, headers, body) of a request made with urllib (no client-side checks or retries)."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()


def wait_idle(srv, timeout=20):
    """The metrics once nothing runs or waits (the scheduler frees a sequence at its next step)."""
    deadline = time.time() + timeout
    while True:
        m = srv.metrics()
        if (m["gptq_running_sequences"] == 0 and m["gptq_waiting_sequences"] == 0) or time.time() > deadline:
            return m
        time.sleep(0.05)


PROMPTS = ["Once upon a time", "The kernel", "In the beginning there was", "A cat sat on",
           "Linux is", "The quick brown fox", "Hello, my name is", "The meaning of life is"]


class ServeOpenAI(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = server("--max-seqs", "32", "--api-key", API_KEY, "--chat-template", TEMPLATE,
                         "--prefill-chunk", "16")
        cls.client = openai.OpenAI(base_url=cls.srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    @classmethod
    def tearDownClass(cls):
        code = cls.srv.stop()
        assert code == 0, f"gptq serve exited with {code}: {cls.srv.proc.stderr.read()}"

    def greedy(self, prompt, n, **kw):
        return self.client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=n, temperature=0, **kw)

    def test_startup_prints_the_memory_plan(self):
        plan = "".join(self.srv.startup)
        self.assertRegex(plan, r"memory plan: weights .* KV cache .* = 32 sequences x 512 positions .* holds \d+ "
                              r"full-context sequences")

    def test_models_and_health(self):
        self.assertEqual([m.id for m in self.client.models.list().data], ["tiny-llama"])
        status, _, body = self.srv.raw("/health", None, method="GET")
        self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))

    def test_greedy_completion_equals_gptq_generate(self):
        r = self.greedy("Once upon a time", 24)
        out = subprocess.run([GPTQ, "generate", MODEL, "-p", "Once upon a time", "-n", "24", "--temperature", "0"],
                             capture_output=True, text=True, check=True).stdout
        # The server decodes the new tokens after the prompt's last one, so the text continues the
        # prompt (", the" here); generate decodes them alone as transformers' decode(new_tokens) does.
        self.assertEqual(r.choices[0].text.lstrip(" "), out[:-1])  # generate ends with a newline
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, 24)
        self.assertEqual(r.usage.prompt_tokens, 5)  # BOS + 4 (gptq tokenize)
        self.assertEqual(r.usage.total_tokens, 29)
        self.assertTrue(r.id.startswith("cmpl-"))
        self.assertEqual(r.object, "text_completion")

    def test_prompt_as_token_ids(self):
        tok = subprocess.run([GPTQ, "tokenize", MODEL, "Once upon a time"], capture_output=True, text=True,
                             check=True).stdout
        ids = [int(x) for x in tok.split()]
        self.assertEqual(self.greedy(ids, 12).choices[0].text, self.greedy("Once upon a time", 12).choices[0].text)

    def test_stop_strings(self):
        full = self.greedy("Once upon a time", 24).choices[0].text
        word = full.split()[3]
        r = self.greedy("Once upon a time", 24, stop=["zzz-never", word])
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual(r.choices[0].text, full[:full.index(word)])
        # Streamed, the same text: nothing of the stop string leaks out in an earlier chunk.
        chunks = self.greedy("Once upon a time", 24, stop=word, stream=True)
        self.assertEqual("".join(c.choices[0].text for c in chunks), full[:full.index(word)])

    def test_seeds(self):
        def sample(seed):
            return self.client.completions.create(model="tiny-llama", prompt="The kernel", max_tokens=32,
                                                  temperature=1.0, seed=seed).choices[0].text
        a, b, c = sample(1234), sample(1234), sample(1235)
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_completion_logprobs(self):
        r = self.greedy("The kernel", 8, logprobs=3)
        lp = r.choices[0].logprobs
        self.assertEqual(len(lp.tokens), 8)
        self.assertEqual("".join(lp.tokens), r.choices[0].text)
        for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            self.assertLessEqual(p, 0.0)
            self.assertLessEqual(len(top), 3)
            self.assertAlmostEqual(max(top.values()), p, places=5)  # greedy: the most likely token
        self.assertEqual(lp.text_offset[0], 0)

    def test_chat_and_its_stream(self):
        msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]
        r = self.client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=20, temperature=0)
        text = r.choices[0].message.content
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertEqual(r.object, "chat.completion")
        self.assertTrue(text)
        self.assertEqual(r.usage.completion_tokens, 20)
        stream = self.client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=20, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), text)
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "length")
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, 20)
        self.assertEqual(chunks[-1].usage.prompt_tokens, r.usage.prompt_tokens)

    def test_chat_logprobs(self):
        r = self.client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                max_completion_tokens=5, temperature=0, logprobs=True,
                                                top_logprobs=2)
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), 5)
        for t in content:
            self.assertEqual(len(t.top_logprobs), 2)
            self.assertAlmostEqual(t.top_logprobs[0].logprob, t.logprob, places=5)
            self.assertEqual(bytes(t.bytes).decode("utf-8", "replace"), t.token)

    def test_max_tokens_capped_to_the_context(self):
        r = self.greedy("Once upon a time", 100000, extra_body={"ignore_eos": True})
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.prompt_tokens + r.usage.completion_tokens, CTX)

    def test_errors(self):
        def expect(exc, code, **kw):
            with self.assertRaises(exc) as cm:
                self.client.completions.create(**{"model": "tiny-llama", "prompt": "x", **kw})
            self.assertEqual(cm.exception.status_code, code)
            body = cm.exception.body
            self.assertTrue(body["message"])
            self.assertIn("type", body)
            self.assertIn("param", body)
            self.assertIn("code", body)
            return body
        self.assertEqual(expect(openai.NotFoundError, 404, model="gpt-4")["code"], "model_not_found")
        self.assertEqual(expect(openai.BadRequestError, 400, max_tokens="ten")["param"], "max_tokens")
        self.assertEqual(expect(openai.BadRequestError, 400, n=2)["param"], "n")
        self.assertEqual(expect(openai.BadRequestError, 400, temperature=-1)["param"], "temperature")
        self.assertEqual(expect(openai.BadRequestError, 400, stop=[""])["param"], "stop")
        self.assertEqual(expect(openai.BadRequestError, 400, prompt="word " * 2000)["code"],
                         "context_length_exceeded")
        # Truncation only when asked: the last tokens of the prompt are kept.
        r = self.greedy("word " * 2000, 4, extra_body={"truncate_prompt_tokens": 100})
        self.assertEqual(r.usage.prompt_tokens, 100)
        expect(openai.BadRequestError, 400, prompt=[[1, 2], [3, 4]])
        expect(openai.BadRequestError, 400, prompt={"a": 1})
        with self.assertRaises(openai.BadRequestError):
            self.client.chat.completions.create(model="tiny-llama", messages=[{"role": "wizard", "content": "x"}])
        with self.assertRaises(openai.BadRequestError):
            self.client.chat.completions.create(model="tiny-llama", messages=[])
        bad_key = openai.OpenAI(base_url=self.srv.url + "/v1", api_key="wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            bad_key.models.list()
        auth = {"Authorization": "Bearer " + API_KEY}
        status, _, body = self.srv.raw("/v1/completions", b"{not json", auth)
        self.assertEqual(status, 400)
        self.assertIn("not valid JSON", json.loads(body)["error"]["message"])
        status, _, body = self.srv.raw("/v1/completions", b"[1, 2]", auth)
        self.assertEqual(status, 400)
        status, _, body = self.srv.raw("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}', auth)
        self.assertEqual(status, 400)  # invalid UTF-8: a JSON error, echoed safely
        self.assertIn("UTF-8", json.loads(body)["error"]["message"])
        status, _, body = self.srv.raw("/v1/completions", b"[" * 300000 + b"]" * 300000, auth)
        self.assertEqual(status, 400)  # deep nesting: no stack overflow
        status, _, body = self.srv.raw("/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', auth)
        self.assertEqual(status, 413)
        self.assertIn("larger than", json.loads(body)["error"]["message"])
        status, _, _ = self.srv.raw("/v1/embeddings", b"{}", auth)
        self.assertEqual(status, 404)
        self.assertEqual(self.srv.proc.poll(), None)  # still serving

    def test_concurrent_streams_equal_each_alone_and_pages_return_to_zero(self):
        requests = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 12 + i % 20) for i in range(32)]
        alone = [self.greedy(p, n, extra_body={"ignore_eos": True}).choices[0].text for p, n in requests]

        def stream(req):
            p, n = req
            chunks = self.greedy(p, n, stream=True, extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in chunks)
        steps0 = self.srv.metrics()["gptq_steps_total"]
        with ThreadPoolExecutor(max_workers=32) as pool:
            together = list(pool.map(stream, requests))
        for i, (a, t) in enumerate(zip(alone, together)):
            self.assertEqual(t, a, f"request {i} {requests[i]!r}: batched output differs from the same request alone")
        m = wait_idle(self.srv)
        self.assertEqual(m["gptq_kv_pages_used"], 0)
        self.assertEqual(m["gptq_kv_pages_reserved"], 0)
        # Batched for real: far fewer steps than the tokens generated one request at a time.
        self.assertLess(m["gptq_steps_total"] - steps0, sum(n for _, n in requests) / 2)


class ServeLimits(unittest.TestCase):
    """Connection limit, slow clients, disconnects and SIGTERM, on a server of its own."""

    def setUp(self):
        self.srv = server("--max-seqs", "2", "--max-connections", "1", "--timeout", "2")

    def tearDown(self):
        if self.srv.proc.poll() is None:
            self.srv.stop(signal.SIGKILL)

    def open_stream(self, max_tokens):
        """A raw streaming request; returns the socket after the first chunk of text arrived."""
        s = socket.create_connection(("127.0.0.1", self.srv.port), timeout=30)
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "ignore_eos": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            got += s.recv(4096)
        return s, got

    def test_too_many_connections_get_503_with_retry_after(self):
        s, _ = self.open_stream(400)
        status, headers, body = self.srv.raw("/v1/completions", b'{"prompt": "x", "max_tokens": 2}')
        self.assertEqual(status, 503)
        self.assertEqual(headers.get("Retry-After"), "1")
        self.assertEqual(json.loads(body)["error"]["code"], "overloaded")
        s.close()
        m = wait_idle(self.srv)
        self.assertEqual(m["gptq_kv_pages_reserved"], 0)

    def test_disconnect_cancels_the_sequence(self):
        s, _ = self.open_stream(400)
        s.close()
        m = wait_idle(self.srv)
        self.assertEqual(m['gptq_requests_finished_total{reason="cancelled"}'], 1)
        self.assertLess(m["gptq_generation_tokens_total"], 400)
        self.assertEqual(m["gptq_kv_pages_used"], 0)

    def test_slow_client_is_dropped_after_the_timeout(self):
        s = socket.create_connection(("127.0.0.1", self.srv.port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
        t0 = time.time()
        data = s.recv(4096)  # the server gives up on the body: closes (maybe after an error response)
        while data:
            data = s.recv(4096)
        self.assertLess(time.time() - t0, 15)
        s.close()
        self.assertEqual(self.srv.raw("/health", None, method="GET")[0], 200)

    def test_sigterm_finishes_running_requests_and_exits_0(self):
        s, got = self.open_stream(60)
        self.srv.proc.send_signal(signal.SIGTERM)
        s.settimeout(60)
        while b"data: [DONE]" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        s.close()
        self.assertIn(b'"finish_reason":"length"', got)
        self.assertIn(b"data: [DONE]", got)
        self.assertEqual(self.srv.proc.wait(timeout=30), 0)


class ServeLora(unittest.TestCase):
    """LoRA adapters as models of their own (docs/lora.md): chosen per request, mixed in one batch."""

    LORA = os.path.join(ROOT, "tests", "data", "lora")

    @classmethod
    def setUpClass(cls):
        cls.srv = server("--max-seqs", "16", "--lora", os.path.join(cls.LORA, "adapter-a"),
                         "--lora", os.path.join(cls.LORA, "adapter-b") + ":2")
        cls.client = openai.OpenAI(base_url=cls.srv.url + "/v1", api_key="none", max_retries=0, timeout=120)

    @classmethod
    def tearDownClass(cls):
        code = cls.srv.stop()
        assert code == 0, f"gptq serve exited with {code}: {cls.srv.proc.stderr.read()}"

    def test_models_lists_the_adapters(self):
        self.assertEqual([m.id for m in self.client.models.list().data], ["tiny-llama", "adapter-a", "adapter-b"])
        status, _, body = self.srv.raw("/v1/completions", b'{"model": "adapter-c", "prompt": "x", "max_tokens": 2}')
        self.assertEqual(status, 404)
        self.assertIn("adapter-a", json.loads(body)["error"]["message"])

    def test_each_model_equals_gptq_generate_with_its_lora_and_mixes_in_a_batch(self):
        flags = {"tiny-llama": [], "adapter-a": ["--lora", os.path.join(self.LORA, "adapter-a")],
                 "adapter-b": ["--lora", os.path.join(self.LORA, "adapter-b") + ":2"]}
        want = {}
        for name, extra in flags.items():
            out = subprocess.run([GPTQ, "generate", MODEL, "-p", "Once upon a time", "-n", "12", "--temperature", "0",
                                  "--ignore-eos", *extra], capture_output=True, text=True, check=True)
            want[name] = out.stdout[:-1]  # generate ends with a newline
        self.assertEqual(len(set(want.values())), 3, want)  # the adapters change the text

        def one(name):
            r = self.client.completions.create(model=name, prompt="Once upon a time", max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
            return name, r.choices[0].text.lstrip(" ")  # as test_greedy_completion_equals_gptq_generate
        with ThreadPoolExecutor(max_workers=9) as pool:
            got = list(pool.map(one, list(flags) * 3))
        for name, text in got:
            self.assertEqual(text, want[name], name)


if __name__ == "__main__":
    GPTQ = sys.argv.pop(1)
    unittest.main(verbosity=2)
