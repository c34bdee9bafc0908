"""Triton Inference Server (issue 27, docs/triton.md): the repository `janusflow triton-repo` writes, its
configs checked against the ONNX graphs, and the python-ort variant run for real on the bundled server of
the nvidia-pytriton wheel, talked to over HTTP and gRPC with tritonclient. Answers are compared with the
CLI's (the in-process ort pipeline) for the same request: greedy tokens exactly, latents from the same
initial latents within the Euler output's FP32 tolerance (export/specs.py: z_next's Tol).

The server's environment (.venv-triton at the repository root: numpy<2 and the wheel over this venv's
packages) is made by the first run and reused after (`make triton-env` makes it too)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from contract import assert_refused
from google.protobuf import text_format
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import np_to_triton_dtype

from janusflow_trt import cli
from janusflow_trt.errors import JanusFlowError
from janusflow_trt.export.specs import build_specs, compare
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.triton import client
from janusflow_trt.triton.marker import MARKER
from janusflow_trt.triton.repo import write_repo
from janusflow_trt.triton.server import build_env, unsupported

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in this image?"
PROMPT = "A red fox in autumn leaves"
GRAPH_MODELS = ("siglip", "embed", "llm", "llm_gen", "gen_enc", "gen_dec", "vae_dec")


def config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """config.pbtxt parsed by protobuf's text format into Triton's own ModelConfig message (unknown fields
    or bad syntax raise)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def onnx_io(path: Path) -> dict[str, list[tuple[str, str, list[int | str]]]]:
    """The graph's inputs / outputs: (name, Triton data type, dims with symbolic axes by name)."""
    g = onnx.load(str(path), load_external_data=False).graph

    def one(v) -> tuple[str, str, list[int | str]]:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        return v.name, "TYPE_" + np_to_triton_dtype(np_dtype), dims

    return {"input": [one(v) for v in g.input], "output": [one(v) for v in g.output]}


# -- the configs against the graphs (no server) ------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_repo(tiny_dir, tiny_onnx, tmp_path_factory):
    return write_repo(tiny_dir, tiny_onnx, tmp_path_factory.mktemp("triton") / "onnx_repo", "onnx", "fp32", 2)


def test_onnx_configs_match_the_graphs(onnx_repo):
    batched = set()
    for g in GRAPH_MODELS:
        d = onnx_repo / f"janusflow_{g}"
        c, io = config(d), onnx_io(d / "1" / "model.onnx")
        assert c.name == d.name and c.platform == "onnxruntime_onnx"
        assert [(i.count, model_config_pb2.ModelInstanceGroup.Kind.Name(i.kind)) for i in c.instance_group] == \
            [(2, "KIND_AUTO")]
        for kind, tensors in (("input", c.input), ("output", c.output)):
            want = io[kind]
            assert [t.name for t in tensors] == [n for n, _, _ in want], (g, kind)
            for t, (name, dtype, dims) in zip(tensors, want, strict=True):
                assert model_config_pb2.DataType.Name(t.data_type) == dtype, (g, name)
                if c.max_batch_size > 0:  # Triton's batch axis is the graph's first, symbolic, axis
                    assert isinstance(dims[0], str), (g, name, dims)
                    dims = dims[1:]
                assert list(t.dims) == [-1 if isinstance(d, str) else d for d in dims], (g, name)
        if c.max_batch_size > 0:
            batched.add(g)
            firsts = {d[0] for _, _, d in io["input"] + io["output"]}
            assert len(firsts) == 1, (g, firsts)  # one batch axis shared by every tensor
            assert c.HasField("dynamic_batching")
        else:
            assert not c.HasField("dynamic_batching")
        # warm-up: one request per input, shapes the graph admits
        (w,) = c.model_warmup
        assert set(w.inputs) == {n for n, _, _ in io["input"]}
        onnx.checker.check_model(str(d / "1" / "model.onnx"))  # the graph file (with its external data)
    # gen_dec mixes the CFG halves and reads cfg_weight / dt without a batch axis; gen_enc's rows come in pairs
    assert batched == {"siglip", "embed", "llm", "llm_gen", "vae_dec"}


def test_python_ort_configs_declare_the_same_io(onnx_repo, tiny_dir, tiny_onnx, tmp_path):
    py = write_repo(tiny_dir, tiny_onnx, tmp_path / "py_repo", "python-ort", "fp32", 1)
    for g in GRAPH_MODELS:
        a, b = config(onnx_repo / f"janusflow_{g}"), config(py / f"janusflow_{g}")
        assert b.backend == "python" and not b.platform
        assert (a.input, a.output, a.max_batch_size) == (b.input, b.output, b.max_batch_size), g
    for loop, decoupled in (("janusflow_chat", True), ("janusflow_t2i", False)):
        c = config(py / loop)
        assert c.backend == "python" and c.model_transaction_policy.decoupled == decoupled
        assert (py / loop / "1" / "checkpoint" / "tokenizer.json").is_file()
    assert "tritonserver --model-repository" in (py / "README.md").read_text()


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------------
def test_bad_input_is_refused_and_writes_nothing(tiny_dir, tiny_onnx, tmp_path, capfd):
    out = tmp_path / "repo"
    base = ["triton-repo", "--model", tiny_dir, "--out", out]
    empty = tmp_path / "no_manifest"
    empty.mkdir()
    assert_refused(base + ["--artifacts", empty], capfd, [tmp_path, tiny_onnx], "no manifest.json")
    assert_refused(base + ["--artifacts", tiny_onnx, "--backend", "tensorflow"], capfd, [tmp_path, tiny_onnx],
                   "unknown --backend")
    assert_refused(base + ["--artifacts", tiny_onnx, "--precision", "fp16"], capfd, [tmp_path, tiny_onnx],
                   "not exported at precision fp16")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_refused(base + ["--artifacts", tiny_onnx], capfd, [tmp_path, tiny_onnx], "is not empty")
    assert_refused(base + ["--artifacts", tiny_onnx, "--force"], capfd, [tmp_path], "refusing to replace")
    ours = tmp_path / "ours"
    assert cli.main(["triton-repo", "--model", str(tiny_dir), "--artifacts", str(tiny_onnx), "--out", str(ours)]) == 0
    assert_refused(["triton-repo", "--model", tiny_dir, "--artifacts", tiny_onnx, "--out", ours], capfd, [tmp_path],
                   "use --force")
    assert cli.main(["triton-repo", "--model", str(tiny_dir), "--artifacts", str(tiny_onnx), "--out", str(ours),
                     "--backend", "python-ort", "--force"]) == 0
    assert json.loads((ours / MARKER).read_text())["backend"] == "python-ort"


def test_trt_configs_declare_the_engines_io(onnx_repo, tiny_dir, tiny_onnx, tmp_path, capfd):
    """--backend trt over an engines.json as `janusflow build` writes it (the plan files here are stand-ins:
    no TensorRT on this machine; what is checked is the repository's layout and configs, not the engines)."""
    cfg = load_config(tiny_dir)
    engines = tmp_path / "engines"
    engines.mkdir()
    for g in GRAPH_MODELS:
        (engines / f"{g}.plan").write_bytes(b"not an engine")
    manifest = {"format_version": 1, "precision": "fp16", "config_sha256": cfg.sha256,
                "engines": {g: {"file": f"{g}.plan"} for g in GRAPH_MODELS}}
    (engines / "engines.json").write_text(json.dumps(manifest))
    assert_refused(["triton-repo", "--model", tiny_dir, "--artifacts", engines, "--out", tmp_path / "r",
                    "--backend", "trt"], capfd, [tmp_path], "are fp16, not fp32")
    trt = write_repo(tiny_dir, engines, tmp_path / "trt_repo", "trt", "fp16", 1)
    for g in GRAPH_MODELS:
        a, b = config(onnx_repo / f"janusflow_{g}"), config(trt / f"janusflow_{g}")
        assert b.platform == "tensorrt_plan" and (trt / f"janusflow_{g}" / "1" / "model.plan").is_file()
        # fp16 engines carry the KV cache in FP16, everything else as the fp32 graphs
        for x, y in zip(list(a.input) + list(a.output), list(b.input) + list(b.output), strict=True):
            assert (x.name, list(x.dims)) == (y.name, list(y.dims))
            kv = x.name.startswith(("past_key_values.", "present."))
            assert model_config_pb2.DataType.Name(y.data_type) == ("TYPE_FP16" if kv else
                                                                   model_config_pb2.DataType.Name(x.data_type))


def test_client_errors_are_one_line(tmp_path, test_image, capfd):
    (port,) = free_ports(1)
    for url in (f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        assert_refused(["chat", "--triton", url, "--image", test_image, "--question", QUESTION], capfd, [tmp_path],
                       "cannot reach")
        assert_refused(["generate", "--triton", url, "--prompt", PROMPT, "--out", tmp_path / "x.png"], capfd,
                       [tmp_path], "cannot reach")
    assert_refused(["chat", "--triton", "127.0.0.1:8001", "--image", test_image, "--question", QUESTION], capfd,
                   [tmp_path], "expected grpc://HOST:PORT")
    assert_refused(["chat", "--image", test_image, "--question", QUESTION], capfd, [tmp_path],
                   "--model is required")


# -- the bundled server, for real ----------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_onnx, tmp_path_factory):
    """`janusflow triton-server` on the python-ort repository of the tiny export: -> (http url, grpc url,
    metrics url). The environment is made on first use (.venv-triton, reused after)."""
    why = unsupported()
    if why:
        pytest.skip(f"the bundled Triton server cannot run here: {why}")
    t0 = time.perf_counter()
    env = build_env(ROOT / ".venv-triton")
    print(f"\ntriton env ready in {time.perf_counter() - t0:.1f} s")
    d = tmp_path_factory.mktemp("triton_live")
    repo = write_repo(tiny_dir, tiny_onnx, d / "repo", "python-ort", "fp32", 1)
    http, grpc, metrics = free_ports(3)
    log = (d / "server.log").open("w")
    argv = [sys.executable, "-m", "janusflow_trt.cli", "triton-server", "--repo", str(repo), "--env", str(env.root),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    c = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    try:
        while not _ready(c):
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise AssertionError(f"tritonserver did not become ready (exit {proc.poll()}):\n"
                                     + (d / "server.log").read_text()[-4000:])
            time.sleep(0.5)
        print(f"triton server ready in {time.perf_counter() - t0:.1f} s")
        yield f"http://127.0.0.1:{http}", f"grpc://127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics", \
            d / "server.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its stub processes (their own session)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _ready(c) -> bool:
    try:
        return c.is_server_ready()
    except Exception:  # not listening yet
        return False


def cli_json(capsys, argv: list) -> dict:
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def cli_chat(tiny_dir, tiny_onnx, test_image):
    """The CLI's greedy answer (in-process ort pipeline), keyed by (question, max_new_tokens)."""
    cache: dict = {}

    def get(capsys, question: str = QUESTION, n: int = 12) -> dict:
        if (question, n) not in cache:
            cache[question, n] = cli_json(capsys, ["chat", "--json", "--model", tiny_dir, "--backend", "ort",
                                                   "--artifacts", tiny_onnx, "--image", test_image, "--question",
                                                   question, "--max-new-tokens", n])
        return cache[question, n]

    return get


def triton_chat(url: str, image: Path, question: str = QUESTION, n: int = 12) -> tuple[list[int], str]:
    ids, text = [], []
    for piece_ids, piece in client.chat_stream(url, image.read_bytes(), question, max_new_tokens=n):
        ids += piece_ids
        text.append(piece)
    return ids, "".join(text)


def test_chat_tokens_equal_the_cli_over_http_and_grpc(server, cli_chat, test_image, capsys):
    http, grpc, _, log = server
    want = cli_chat(capsys)
    assert len(want["token_ids"]) > 1
    # the loop models ran this package under the environment's numpy 1.x (nvidia-pytriton pins numpy < 2)
    versions = re.findall(r"janusflow_chat: janusflow_trt \S+ from (\S+), numpy (\S+),", log.read_text())
    assert versions and versions[0][1].startswith("1."), versions
    assert Path(versions[0][0]).resolve() == (ROOT / "janusflow_trt").resolve(), versions
    for url in (grpc, http):
        assert triton_chat(url, test_image) == (want["token_ids"], want["text"]), url


def test_sampled_chat_with_a_seed_equals_the_cli(server, tiny_dir, tiny_onnx, test_image, capsys):
    """temperature > 0: the chat model seeds torch's RNG in its own process as Pipeline.chat does."""
    http, grpc, *_ = server
    want = cli_json(capsys, ["chat", "--json", "--model", tiny_dir, "--backend", "ort", "--artifacts", tiny_onnx,
                             "--image", test_image, "--question", QUESTION, "--max-new-tokens", 10,
                             "--temperature", 1.5, "--top-p", 0.9, "--seed", 7])
    for url in (grpc, http):
        ids = [i for piece, _ in client.chat_stream(url, test_image.read_bytes(), QUESTION, max_new_tokens=10,
                                                    temperature=1.5, top_p=0.9, seed=7) for i in piece]
        assert ids == want["token_ids"], url


def test_chat_cli_with_triton_flag(server, cli_chat, test_image, capsys):
    got = cli_json(capsys, ["chat", "--json", "--triton", server[1], "--image", test_image, "--question", QUESTION,
                            "--max-new-tokens", 12])
    assert got["token_ids"] == cli_chat(capsys)["token_ids"] and got["text"] == cli_chat(capsys)["text"]


@pytest.fixture(scope="module")
def z0():
    return np.random.default_rng(3).standard_normal((2, 4, 48, 48)).astype(np.float32)


def cli_latents(tmp_path: Path, tiny_dir, tiny_onnx, z0: np.ndarray, steps: int, prompt: str = PROMPT) -> np.ndarray:
    z0_file, lat = tmp_path / "z0.npy", tmp_path / "cli_latents.npy"
    np.save(z0_file, z0)
    assert cli.main(["generate", "--model", str(tiny_dir), "--backend", "ort", "--artifacts", str(tiny_onnx),
                     "--prompt", prompt, "--steps", str(steps), "--num-images", str(len(z0)), "--init-latents",
                     str(z0_file), "--save-latents", str(lat), "--out", str(tmp_path / "cli.png"), "--force"]) == 0
    return np.load(lat)


def test_latents_equal_the_cli_over_http_and_grpc(server, tiny_dir, tiny_onnx, z0, tmp_path, capsys):
    http, grpc, *_ = server
    want = cli_latents(tmp_path, tiny_dir, tiny_onnx, z0, steps=3)
    tol = next(t.tol for t in build_specs(load_config(tiny_dir))["gen_dec"].outputs if t.name == "z_next")
    for url in (grpc, http):
        images, latents = client.generate(url, PROMPT, num_images=2, steps=3, init_latents=z0)
        r = compare(latents, want, tol)
        assert r["ok"], (url, r)
        assert images.shape == (2, 384, 384, 3) and images.dtype == np.uint8
    # the CLI's --triton path writes the same files as the in-process one
    out = tmp_path / "t.png"
    np.save(tmp_path / "z0.npy", z0)
    assert cli.main(["generate", "--triton", grpc, "--prompt", PROMPT, "--steps", "3", "--num-images", "2",
                     "--init-latents", str(tmp_path / "z0.npy"), "--save-latents", str(tmp_path / "t.npy"),
                     "--out", str(out)]) == 0
    assert compare(np.load(tmp_path / "t.npy"), want, tol)["ok"]
    assert (tmp_path / "t_0.png").is_file() and (tmp_path / "t_1.png").is_file()


def test_a_bad_request_is_one_line_and_the_server_stays_up(server, test_image):
    http, grpc, *_ = server
    for url in (grpc, http):
        with pytest.raises(JanusFlowError, match="the question is empty"):
            triton_chat(url, test_image, question="   ")
        with pytest.raises(JanusFlowError, match="cannot read image"):
            list(client.chat_stream(url, b"not an image", QUESTION))
    with pytest.raises(JanusFlowError, match="num.images"):
        client.generate(grpc, PROMPT, num_images=0, steps=2)
    assert httpclient.InferenceServerClient(http[len("http://"):]).is_server_ready()


def test_eight_concurrent_clients_then_metrics(server, cli_chat, tiny_dir, tiny_onnx, test_image, z0, tmp_path,
                                               capsys):
    """8 clients at once, chats and images, HTTP and gRPC: each answer equals its request's CLI answer; the
    server is still ready after; its metrics count every model's requests (the BLS calls included)."""
    http, grpc, metrics, _ = server
    questions = (QUESTION, "Describe the colours.")
    chats = {q: cli_chat(capsys, q, 8) for q in questions}
    lat = {}
    for k in (0, 1):
        (tmp_path / f"z{k}").mkdir()
        lat[k] = cli_latents(tmp_path / f"z{k}", tiny_dir, tiny_onnx, z0[k:k + 1], steps=2)
    tol = next(t.tol for t in build_specs(load_config(tiny_dir))["gen_dec"].outputs if t.name == "z_next")
    # (kind, which request, url): 4 chats and 4 images, each question / latent twice, HTTP and gRPC
    jobs = [("chat", i % 2, (grpc, http)[i // 2]) for i in range(4)] + \
           [("image", i % 2, (http, grpc)[i // 2]) for i in range(4)]
    before = counts(metrics)

    def run(job):
        kind, k, url = job
        if kind == "chat":
            return triton_chat(url, test_image, questions[k], 8)
        return client.generate(url, PROMPT, num_images=1, steps=2, init_latents=z0[k:k + 1])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs, timeout=300))
    for (kind, k, url), got in zip(jobs, results, strict=True):
        if kind == "chat":
            assert got == (chats[questions[k]]["token_ids"], chats[questions[k]]["text"]), (k, url)
        else:
            assert compare(got[1], lat[k], tol)["ok"], (k, url)
    assert httpclient.InferenceServerClient(http[len("http://"):]).is_server_ready()
    assert grpcclient.InferenceServerClient(grpc[len("grpc://"):]).is_server_ready()
    after = counts(metrics)
    delta = {m: after.get(m, 0) - before.get(m, 0) for m in after}
    assert delta["janusflow_chat"] == 4 and delta["janusflow_t2i"] == 4, delta
    # every chat token is an embed + llm call; every Euler step a gen_enc, llm_gen, gen_dec call
    assert delta["janusflow_siglip"] == 4 and delta["janusflow_vae_dec"] == 4, delta
    assert delta["janusflow_gen_enc"] == delta["janusflow_llm_gen"] == delta["janusflow_gen_dec"] == 4 * 2, delta
    assert delta["janusflow_llm"] >= 4 * 8, delta


def counts(url: str) -> dict[str, float]:
    """Successful inference requests per model, from the server's Prometheus endpoint."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "nv_inference_request_success":
            for s in fam.samples:
                out[s.labels["model"]] = out.get(s.labels["model"], 0) + s.value
    return out
