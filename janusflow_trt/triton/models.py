"""The Python-backend models of a generated repository. Each model.py there only binds the stub's
`triton_python_backend_utils` (pb) to one of these classes; the classes run inside Triton's Python stub.

- janusflow_chat (decoupled) and janusflow_t2i run the pipeline itself: a Pipeline whose engine is the
  RuntimeEngine over BlsBackend, so the decode loop, the prefix prefill, the CFG Euler loop and the VAE
  call are the runtime's own step functions (runtime/decode.py, runtime/euler_step.py, runtime/text2img.py),
  and each graph call is a BLS request to that graph's model, which Triton places and scales on its own.
- janusflow_<graph> in the python-ort variant: ort_model.py (numpy and onnxruntime only: it loads fast).

The KV cache lives in the loop model's process and crosses to the llm model with every call (the graphs
are stateless): on one machine that is a shared-memory copy per step; Triton's implicit state / sequence
batching (Conceptual_Guide Part_7) would keep it beside the llm model instead (not done).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import janusflow_trt
from janusflow_trt.api import Pipeline
from janusflow_trt.engines import RuntimeEngine
from janusflow_trt.errors import InputError, JanusFlowError
from janusflow_trt.export.specs import VIEWS, GraphSpec, build_specs, precision_variant
from janusflow_trt.images import load_image
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.janusflow_ref.processor import SYSTEM_PROMPT, Processor
from janusflow_trt.runtime.backends import spec_kv_dtype

from .configs import model_name
from .ort_model import parameter

CHECKPOINT = "checkpoint"  # the loop models' copy of config, tokenizer and processor files, in their version dir


class BlsBackend:
    """The backend seam over BLS: run(graph, feeds) is one InferenceRequest to model_name(graph), made
    from inside a Python-backend model (pb: the stub's triton_python_backend_utils). CPU torch tensors in
    and out; each result is a fresh tensor (valid as long as the caller holds it)."""

    name = "triton-bls"
    device = torch.device("cpu")
    capturable, stream = False, None

    def __init__(self, pb: Any, specs: dict[str, GraphSpec], view_parent: dict[str, str]):
        """view_parent: views the repository has no model for (an older export): their parent runs."""
        self.pb, self.specs, self.view_parent = pb, specs, view_parent
        self.kv_dtype = spec_kv_dtype(specs)

    def graph_file(self, graph: str) -> Path | None:
        return None

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec, target = self.specs[graph], self.view_parent.get(graph, graph)
        inputs = [self.pb.Tensor(t.name, feeds[t.name].detach().cpu().contiguous().numpy()) for t in spec.inputs]
        resp = self.pb.InferenceRequest(model_name=model_name(target), inputs=inputs,
                                        requested_output_names=spec.output_names).exec()
        if resp.has_error():
            raise JanusFlowError(f"{model_name(target)}: {resp.error().message()}")
        return {n: torch.from_numpy(self.pb.get_output_tensor_by_name(resp, n).as_numpy().copy())
                for n in spec.output_names}


def load_pipeline(pb: Any, args: dict[str, str]) -> Pipeline:
    """The Pipeline of a loop model: its checkpoint copy, the repository's precision, BLS for every graph.
    Logs the versions the stub's Python runs (numpy < 2 with the bundled server)."""
    pb.Logger.log_info(f"{args['model_name']}: janusflow_trt {janusflow_trt.__version__} from "
                       f"{Path(janusflow_trt.__file__).parent}, numpy {np.__version__}, torch {torch.__version__}")
    config = json.loads(args["model_config"])
    ckpt = Path(args["model_repository"]) / args["model_version"] / CHECKPOINT
    cfg, processor = load_config(ckpt), Processor(ckpt)
    precision = parameter(config, "precision")
    specs = {n: precision_variant(s, precision) for n, s in build_specs(cfg).items()}
    missing = [v for v in parameter(config, "views_missing", "").split(",") if v]
    backend = BlsBackend(pb, specs, {v: VIEWS[v][0] for v in missing})
    return Pipeline(cfg, processor, RuntimeEngine(backend, cfg, processor), backend.name)


def scalar(pb: Any, request: Any, name: str, kind: type, default: Any) -> Any:
    """An optional [1] input as a Python value (bytes -> str)."""
    t = pb.get_input_tensor_by_name(request, name)
    if t is None:
        if default is None:
            raise InputError(f"input {name!r} is required")
        return default
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise InputError(f"input {name!r} must hold one value, got {a.size}")
    v = a[0]
    if kind is str:
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return kind(v)


class RequestImage(io.BytesIO):
    """The request's image file, named so in load_image's messages."""

    def __str__(self) -> str:
        return "(the request's image)"


def image_bytes(pb: Any, r: Any) -> bytes:
    """`image` (the file's bytes: gRPC, HTTP binary) or `image_base64` (the generate endpoints' JSON)."""
    raw, b64 = (pb.get_input_tensor_by_name(r, n) for n in ("image", "image_base64"))
    if (raw is None) == (b64 is None):
        raise InputError("give exactly one of the inputs 'image' (the file's bytes) and 'image_base64'")
    if raw is not None:
        return scalar(pb, r, "image", bytes, None)
    try:
        return base64.b64decode(scalar(pb, r, "image_base64", str, None), validate=True)
    except ValueError:
        raise InputError("input 'image_base64' is not base64") from None


class ChatModel:
    """janusflow_chat (decoupled): one response per sampled token (token_ids [1], text: the piece it
    completes, maybe empty), then a final one with the detokenizer's rest (token_ids [0])."""

    pb: Any = None  # bound by the repository's model.py

    def initialize(self, args: dict[str, str]) -> None:
        self.pipe = load_pipeline(self.pb, args)

    def execute(self, requests: list) -> None:
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for r in requests:
            sender = r.get_response_sender()
            try:
                self.answer(r, sender)
            except JanusFlowError as e:
                sender.send(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))), flags=final)
        return None

    def response(self, ids: list[int], text: str) -> Any:
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[pb.Tensor("token_ids", np.array(ids, dtype=np.int64)),
                                                    pb.Tensor("text", np.array([text.encode()], dtype=np.object_))])

    def answer(self, r: Any, sender: Any) -> None:
        pb, pipe = self.pb, self.pipe
        image = load_image(RequestImage(image_bytes(pb, r)))  # type: ignore[arg-type]
        seed = scalar(pb, r, "seed", int, 42)
        inputs, params = pipe.chat_request(image, scalar(pb, r, "question", str, None),
                                           scalar(pb, r, "max_new_tokens", int, 512),
                                           scalar(pb, r, "temperature", float, 0.0), scalar(pb, r, "top_p", float, 1.0),
                                           seed, SYSTEM_PROMPT)
        detok = pipe.detokenizer()
        torch.manual_seed(seed)  # as Pipeline.chat: sampling draws from torch's global RNG (this process's)
        for t in pipe.engine.chat_tokens(inputs, params):
            sender.send(self.response([t], detok.put(t)))
        sender.send(self.response([], detok.end()), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class T2IModel:
    """janusflow_t2i: Pipeline.generate (prefix prefill, the CFG Euler loop, the VAE) -> images [n, H, W, 3]
    uint8 and the final latents [n, 4, 48, 48] float32."""

    pb: Any = None

    def initialize(self, args: dict[str, str]) -> None:
        self.pipe = load_pipeline(self.pb, args)

    def execute(self, requests: list) -> list:
        pb, out = self.pb, []
        for r in requests:
            try:
                init = pb.get_input_tensor_by_name(r, "init_latents")
                res = self.pipe.generate(scalar(pb, r, "prompt", str, None),
                                         num_images=scalar(pb, r, "num_images", int, 1),
                                         steps=scalar(pb, r, "steps", int, 30),
                                         cfg_weight=scalar(pb, r, "cfg_weight", float, 2.0),
                                         seed=scalar(pb, r, "seed", int, 12345),
                                         init_latents=None if init is None else init.as_numpy().copy())
                images = np.stack([np.asarray(im) for im in res.images])
                out.append(pb.InferenceResponse(output_tensors=[pb.Tensor("images", images),
                                                                pb.Tensor("latents", res.latents)]))
            except JanusFlowError as e:
                out.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))))
        return out
