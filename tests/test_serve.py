"""`janusflow serve` on the tiny checkpoint over the tiny ONNX export (ort): started in-process on a free
127.0.0.1 port, spoken to with the real `openai` client (chat plain / streamed / seeded / stop strings,
images) whose answers must equal the CLI's and the Pipeline's for the same request, and with raw HTTP
for the malformed cases (each a 4xx with an OpenAI error object, never a traceback)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from openai import OpenAI
from PIL import Image

from janusflow_trt import Pipeline, cli
from janusflow_trt.serve.app import Settings, create_app
from janusflow_trt.serve.engine import EngineLoop, Job, Outbox
from janusflow_trt.serve.metrics import Metrics
from janusflow_trt.serve.protocol import ServeError

KEY = "test-key"
QUESTION = "What is in this image?"
MAX_BODY = 2 * 2**20


def _serve(pipe: Pipeline, **settings):
    """-> (base URL, app) of a server started in-process; stopped when the generator is closed."""
    app = create_app(pipe, Settings(model_name="tiny", api_key=KEY, max_body_bytes=MAX_BODY, request_timeout_s=60,
                                    **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on (no race with another process)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_onnx):
    """The model loads before the port opens, as `janusflow serve` does."""
    yield from _serve(Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx))


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def ref(tiny_dir, tiny_onnx):
    return Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx)


@pytest.fixture(scope="module")
def image_url(test_image):
    return "data:image/png;base64," + base64.b64encode(test_image.read_bytes()).decode()


def user(image_url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def cli_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


# -- answers equal the CLI's and the Pipeline's ---------------------------------------------------------
def test_chat_equals_cli(client, image_url, tiny_dir, tiny_onnx, test_image, capsys):
    r = client.chat.completions.create(model="tiny", messages=user(image_url), max_tokens=12)
    want = cli_json(capsys, ["chat", "--json", "--model", str(tiny_dir), "--backend", "ort", "--artifacts",
                             str(tiny_onnx), "--image", str(test_image), "--question", QUESTION,
                             "--max-new-tokens", "12"])
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(want["token_ids"]) and r.usage.prompt_tokens == want["prompt_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(want["token_ids"]) == 12 else "stop")


def test_chat_stream_equals_pipeline(client, image_url, ref, test_image):
    want = ref.chat(Image.open(test_image), QUESTION, max_new_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=user(image_url), max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if len(want.token_ids) == 12 else "stop"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_sampled_chat_with_seed_equals_pipeline(client, image_url, ref, test_image):
    want = ref.chat(Image.open(test_image), QUESTION, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    r = client.chat.completions.create(model="tiny", messages=user(image_url), max_tokens=10, temperature=0.8,
                                       top_p=0.9, seed=7)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids)


def test_concurrent_requests_each_equal_their_solo_run(client, image_url, ref, test_image):
    """Four clients at once with different seeds: each answer is its own seed's, whatever ran beside it."""
    kw = dict(max_tokens=8, temperature=0.9, top_p=0.95)
    want = {s: ref.chat(Image.open(test_image), QUESTION, max_new_tokens=8, temperature=0.9, top_p=0.95,
                        seed=s).text for s in range(4)}
    assert len(set(want.values())) > 1  # the seeds matter, so a mix-up would show
    got: dict[int, str] = {}
    ask = lambda s: got.__setitem__(s, client.chat.completions.create(
        model="tiny", messages=user(image_url), seed=s, **kw).choices[0].message.content)
    threads = [threading.Thread(target=ask, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_batched_chats_each_equal_their_solo_run(tiny_dir, tiny_onnx, image_url, ref, test_image):
    """--max-batch 4: six clients at once (greedy and seeded, plain and streamed, different questions and
    limits, one with a stop string) decode as rows of one batch; each answer is its solo Pipeline.chat."""
    image = Image.open(test_image)
    asks = [(QUESTION, 0.0, 1.0, 42, 9, False), ("Describe it.", 0.9, 0.95, 1, 12, True),
            ("Which colours?", 0.9, 0.95, 2, 7, False), ("Count.", 0.0, 1.0, 42, 10, True),
            (QUESTION, 0.9, 0.95, 3, 8, False), ("And?", 1.0, 1.0, 4, 5, True)]
    want = [ref.chat(image, q, max_new_tokens=n, temperature=t, top_p=p, seed=s) for q, t, p, s, n, _ in asks]
    full = want[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    got: dict[int, tuple] = {}

    def ask(client: OpenAI, i: int) -> None:
        q, t, p, s, n, stream = asks[i]
        r = client.chat.completions.create(model="tiny", messages=user(image_url, q), max_tokens=n, temperature=t,
                                           top_p=p, seed=s, stream=stream, stop=[stop] if i == 0 else None)
        if stream:
            r = list(r)
            got[i] = ("".join(c.choices[0].delta.content or "" for c in r if c.choices), r[-1].choices[0].finish_reason)
        else:
            got[i] = (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens)

    pipe = Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx)
    gen = _serve(pipe, max_batch=4)
    url, _ = next(gen)
    try:
        client = OpenAI(base_url=url + "/v1", api_key=KEY, timeout=60, max_retries=0)
        threads = [threading.Thread(target=ask, args=(client, i)) for i in range(len(asks))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        gen.close()
    expect = {i: (w.text, "length") if asks[i][5] else (w.text, "length", len(w.token_ids))
              for i, w in enumerate(want)}
    expect[0] = (full[:full.find(stop)], "stop", got.get(0, (0, 0, -1))[2])
    assert got == expect


def test_stop_string_ends_the_answer(client, image_url, ref, test_image):
    full = ref.chat(Image.open(test_image), QUESTION, max_new_tokens=12).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=user(image_url), max_tokens=12, stop=[stop],
                                           stream=stream)
        if stream:
            r = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            finish = r[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == full[:full.find(stop)] and finish == "stop", (stream, text, full, stop)


def test_images_equal_cli(client, tiny_dir, tiny_onnx, tmp_path, capsys):
    r = client.images.generate(model="tiny", prompt="a red fox", n=2, size="384x384", response_format="b64_json",
                               extra_body={"seed": 7, "num_inference_steps": 3, "guidance_scale": 2.0})
    got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in r.data]
    cli_json(capsys, ["generate", "--json", "--model", str(tiny_dir), "--backend", "ort", "--artifacts",
                      str(tiny_onnx), "--prompt", "a red fox", "--num-images", "2", "--steps", "3", "--seed", "7",
                      "--cfg", "2", "--out", str(tmp_path / "fox.png")])
    for i, g in enumerate(got):
        assert g.shape == (384, 384, 3)
        assert np.array_equal(g, np.asarray(Image.open(tmp_path / f"fox_{i}.png"))), i


# -- the other endpoints ---------------------------------------------------------------------------
def test_models_health_ready_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    base = server[0]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").json()["status"] == "ready"
    text = httpx.get(base + "/metrics").text
    assert 'janusflow_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    for name in ("janusflow_request_latency_seconds_bucket", "janusflow_time_to_first_token_seconds_count",
                 "janusflow_queue_depth", "janusflow_output_tokens_total", "janusflow_running_requests"):
        assert name in text, name


def test_disconnect_frees_the_engine(server, image_url, ref, test_image):
    """A client that leaves mid-stream stops its decode within a few steps, not at the answer's end."""
    base, app = server
    full = len(ref.chat(Image.open(test_image), QUESTION, max_new_tokens=3000).token_ids)  # 353 tokens, ~0.7 s
    assert full > 100
    engine = app.state.engine
    left: list = []  # the requests the scheduler let go before their end (a spy around its cancel)
    cancel = engine.batch.cancel
    engine.batch.cancel = lambda req: (left.append(req), cancel(req))[1]
    body = {"model": "tiny", "messages": user(image_url), "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while app.state.metrics.running._value.get() or engine.jobs.qsize():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    engine.batch.cancel = cancel
    assert len(left) == 1 and left[0].finish == "cancelled" and 0 < len(left[0].tokens) < full // 2, (left, full)


# -- refusals: a 4xx with an OpenAI error object, one per class ---------------------------------------
def _refusals(image_url: str, big: str) -> list[tuple[str, str, object, int, str]]:
    """(name, path, body: dict | raw bytes, status, a phrase the message must hold)"""
    chat = {"model": "tiny", "messages": user(image_url), "max_tokens": 4}
    img = {"prompt": "a fox"}
    return [
        ("bad json", "/v1/chat/completions", b"{bad", 400, "not valid JSON"),
        ("not an object", "/v1/chat/completions", b"[1]", 400, "JSON object"),
        ("wrong type", "/v1/chat/completions", {**chat, "max_tokens": "4"}, 400, "max_tokens"),
        ("missing field", "/v1/images/generations", {}, 400, "prompt"),
        ("unknown model", "/v1/chat/completions", {**chat, "model": "gpt-9"}, 404, "gpt-9"),
        ("remote image", "/v1/chat/completions",
         {**chat, "messages": user("https://example.com/cat.png")}, 400, "not fetched"),
        ("not an image", "/v1/chat/completions",
         {**chat, "messages": user("data:image/png;base64," + base64.b64encode(b"hello").decode())}, 400,
         "not a image/png"),
        ("gif", "/v1/chat/completions", {**chat, "messages": user("data:image/gif;base64,R0lG")}, 400, "image/gif"),
        ("bad base64", "/v1/chat/completions", {**chat, "messages": user("data:image/png;base64,@@@")}, 400,
         "base64"),
        ("no image", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "hi"}]}, 400,
         "one image"),
        ("multi-turn", "/v1/chat/completions",
         {**chat, "messages": user(image_url) + [{"role": "assistant", "content": "x"}]}, 400, "multi-turn"),
        ("beyond context", "/v1/chat/completions", {**chat, "max_tokens": 5000}, 400, "context (4096 tokens)"),
        ("pipeline refusal", "/v1/chat/completions", {**chat, "messages": user(image_url, "<image_placeholder>")},
         400, "<image_placeholder>"),
        ("temperature", "/v1/chat/completions", {**chat, "temperature": 5}, 400, "temperature"),
        ("body too large", "/v1/chat/completions", big.encode(), 413, "over the limit"),
        ("size", "/v1/images/generations", {**img, "size": "512x512"}, 400, "384x384"),
        ("n over limit", "/v1/images/generations", {**img, "n": 10_000}, 400, "batch limit"),
        ("url format", "/v1/images/generations", {**img, "response_format": "url"}, 400, "b64_json"),
        ("steps", "/v1/images/generations", {**img, "num_inference_steps": 0}, 400, "num_inference_steps"),
        ("empty prompt", "/v1/images/generations", {**img, "prompt": "  "}, 400, "empty"),
        ("unknown route", "/v1/completions", {}, 404, "Not Found"),
    ]


def test_malformed_requests_get_error_objects(server, image_url):
    base, _ = server
    big = json.dumps({"model": "tiny", "messages": "x" * (MAX_BODY + 1)})
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base, timeout=30, headers=auth) as c:
        for name, path, body, status, phrase in _refusals(image_url, big):
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = c.post(path, **kw)
            if name == "body too large":  # also without a Content-Length (chunked): counted while read
                chunked = c.post(path, content=iter([body[:MAX_BODY // 2], body[MAX_BODY // 2:]]))
                assert chunked.status_code == 413 and "content-length" not in chunked.request.headers
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, name
            assert phrase in err["message"], (name, err["message"])
            assert "Traceback" not in r.text, name
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert c.get("/ready").status_code == 200  # none of them took the server down


def test_api_key_required(server):
    base, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(base + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    r = httpx.post(base + "/v1/images/generations", json={"prompt": "a"})
    assert r.status_code == 401
    assert httpx.get(base + "/health").status_code == 200  # probes stay open


# -- the engine loop ------------------------------------------------------------------------------------
def test_full_queue_is_429_and_a_failing_job_is_500_without_traceback(ref):
    import asyncio

    loop = asyncio.new_event_loop()
    eng = EngineLoop(ref, max_queue=1, metrics=Metrics())

    def boom(pipe, tap, job):
        raise RuntimeError("secret internal detail")

    jobs = [Job("chat", boom, loop, time.monotonic() + 30) for _ in range(3)]
    eng.submit(jobs[0])
    with pytest.raises(ServeError) as e:
        eng.submit(jobs[1])
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    eng.start()
    try:
        kind, err = loop.run_until_complete(asyncio.wait_for(jobs[0].events.get(), 10))
        assert kind == "error" and err.status == 500 and "secret" not in err.message
        eng.submit(jobs[2])  # the thread survived the failure
        assert loop.run_until_complete(asyncio.wait_for(jobs[2].events.get(), 10))[1].status == 500
    finally:
        eng.stop()
        loop.close()


def test_a_rounds_events_reach_the_event_loop_in_one_wakeup():
    """The engine thread's posts during a round go to each event loop in one call_soon_threadsafe, in
    the order posted; outside a round, and from another thread during one, each post goes at once."""

    class Counting(asyncio.SelectorEventLoop):
        wakeups = 0

        def call_soon_threadsafe(self, *a, **k):
            self.wakeups += 1
            return super().call_soon_threadsafe(*a, **k)

    loop = Counting()
    try:
        outbox = Outbox()
        jobs = [Job("chat", lambda *a: None, loop, time.monotonic() + 60, events=asyncio.Queue(), outbox=outbox)
                for _ in range(2)]
        with outbox.round():
            for i in range(3):
                for j in jobs:
                    j.post("delta", i)
            other = threading.Thread(target=jobs[0].post, args=("delta", "other thread"))
            other.start()
            other.join()
            assert loop.wakeups == 1  # the other thread's post only
        assert loop.wakeups == 2  # the round's six posts: one wakeup
        jobs[1].post("done", None)
        assert loop.wakeups == 3
        loop.run_until_complete(asyncio.sleep(0))
        got = [[q.get_nowait()[1] for _ in range(q.qsize())] for q in (j.events for j in jobs)]
        assert got == [["other thread", 0, 1, 2], [0, 1, 2, None]]
    finally:
        loop.close()


def test_image_step_call_size_defaults_to_one_on_the_cpu(ref):
    """On the CPU (a bigger Euler step call costs more per image there) image requests time-slice unless
    --image-step-images says otherwise; the VAE decodes get their own thread (ORT is not capturable)."""
    for asked, want in ((None, 1), (3, 3)):
        eng = EngineLoop(ref, max_queue=1, metrics=Metrics(), max_batch=4, image_step_images=asked)
        assert eng.images is not None and eng.images.step_images == want and eng.images.decoder is not None
        eng.images.close()
