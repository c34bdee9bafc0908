"""Calibration recording: the runtime's own chat and text-to-image loops (runtime/chat.py,
runtime/euler_step.py) on an FP32 backend, with a Recorder wrapped around the seam; which calls are kept
is the Plan's choice (calibration/record.py). The backend (recorder_backend): `ort` over the FP32 export the
variants are derived from, when it holds every graph the recording runs (the graphs the variants'
ranges are measured on, and at full size the faster CPU path: 7.8 s per Euler-step LLM call vs ~17 s
eager); else `torch-fast` on the checkpoint (an export of some graphs only). It runs pipelines, so it
lives above the runtime; calibration/ only reads what it writes (CalibrationData).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from janusflow_trt.calibration.data import InputSet
from janusflow_trt.calibration.record import CHAT_TOKENS, RECORDER_VERSION, Plan, recording_key, subset
from janusflow_trt.errors import InputError
from janusflow_trt.export.specs import VIEWS
from janusflow_trt.fingerprint import sha256_file
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.janusflow_ref.generation import initial_latents, prompt_ids
from janusflow_trt.janusflow_ref.processor import Processor
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.runtime import text2img
from janusflow_trt.runtime.backends import Backend, SeamWrapper, release
from janusflow_trt.runtime.chat import CHAT_ONLY, chat_tokens
from janusflow_trt.runtime.euler_step import euler_loop
from janusflow_trt.runtime.factory import make_backend
from janusflow_trt.validation import text

EULER_GRAPHS = frozenset({"gen_enc", "llm", "gen_dec"})  # what one Euler step calls (llm_gen records as llm)
RUNS = frozenset({"siglip", "embed", "llm", "gen_enc", "gen_dec"})  # the graphs a recording runs (+ vae_dec)


def recorder_backend(graphs: list[str] | None) -> str:
    """`ort` when the FP32 export holds every graph the recording runs (its VAE decode runs where the export
    has vae_dec), else `torch-fast` on the checkpoint. graphs: the export's; None: no export given."""
    return "ort" if graphs is not None and RUNS <= set(graphs) else "torch-fast"


class Recorder(SeamWrapper):
    """Saves the feeds of calls to the graphs in `active` as OUT/<graph>/<n>.npz, tagged with `source`."""

    def __init__(self, inner: Backend, out: Path):
        super().__init__(inner)
        self.name, self.out = f"record({inner.name})", out
        self.active: set[str] = set()
        self.source = ""
        self.files: list[dict[str, Any]] = []

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # a view (the Euler step's llm_gen) takes its parent's inputs: its calls calibrate the parent
        name = VIEWS[graph][0] if graph in VIEWS else graph
        if name in self.active:
            d = self.out / name
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{sum(f['graph'] == name for f in self.files):05d}.npz"
            np.savez(path, **{k: v.cpu().numpy() for k, v in feeds.items()})
            self.files.append({"graph": name, "source": self.source, "file": f"{name}/{path.name}",
                               "sha256": sha256_file(path)})
        return self.inner.run(graph, feeds)


def record_chat(rec: Recorder, cfg, processor: Processor, image, question: str, tokens: int,
                decode_stride: int | None) -> list[int]:
    """Greedy chat through the runtime's loop: prefill calls recorded as `rec.active` says, then the
    decode call of every decode_stride-th new token (None: none). -> the answer's token ids."""
    out = []
    for tok in chat_tokens(rec, cfg, processor.chat_inputs(image, question), SamplingParams(max_new_tokens=tokens),
                           processor.eos_id):
        out.append(tok)  # the next call (after this yield) computes token len(out) + 1
        rec.active = {"llm"} if decode_stride and len(out) % decode_stride == 0 else set()
    return out


def record_t2i(rec: Recorder, cfg, processor: Processor, prompt: str, z0: torch.Tensor, steps: int, cfg_weight: float,
               keep: set[int], run_steps: int, source: str) -> torch.Tensor:
    """The runtime's prefix prefill and Euler loop, the steps in `keep` recorded (the prefix as
    rec.active says on entry); stops after run_steps. -> z after the last step run (a copy)."""
    cache = text2img.prefill_prefix(rec, cfg, processor, prompt, z0.shape[0])
    loop = euler_loop(rec, cache, z0, steps, cfg_weight)
    z = z0
    for step in range(run_steps):
        rec.source = f"{source}:step{step}"
        rec.active = set(EULER_GRAPHS) if step in keep else set()
        z = next(loop).clone()
    loop.close()
    rec.active = set()
    return z


def check_prompts(model_dir: str | Path, inputs: InputSet) -> None:
    """Refuse, before any work, every prompt the recording would refuse or misread: beyond the model's
    context with its image tokens (generation.prompt_ids' rule), blank, or holding a special token; the
    message names the prompt's file and line (InputSet.origin)."""
    cfg, processor = load_config(model_dir), Processor(model_dir)
    special = processor.special_tokens
    for i, prompt in enumerate(inputs.prompts):
        try:
            text("the prompt", prompt, special)
            prompt_ids(processor, prompt, cfg)
        except InputError as e:
            raise InputError(f"{inputs.origin(i)}: {e}") from None


def record(model_dir: str | Path, vae_dir: str | Path | None, out: str | Path, inputs: InputSet,
           plan: Plan = Plan(), progress: bool = True, artifacts: str | Path | None = None,
           graphs: list[str] | None = None) -> dict[str, Any]:
    """Run chat and text-to-image on an FP32 backend (recorder_backend: ORT over `artifacts`, the FP32
    export of `graphs`, or torch-fast on the checkpoint); write DIR atomically; -> index."""
    model_dir, out = Path(model_dir), Path(out)
    vae_dir = Path(vae_dir) if vae_dir is not None else None
    runner = recorder_backend(graphs if artifacts is not None else None)
    key, given_sha = recording_key(model_dir, vae_dir, inputs, plan, runner), inputs.sha256()
    inputs = subset(inputs, plan)
    cfg = load_config(model_dir)
    processor = Processor(model_dir)
    backend = make_backend(runner, model_dir, artifacts if runner == "ort" else None, cfg, vae_dir=vae_dir)
    if runner == "ort" and vae_dir is not None and "vae_dec" not in (graphs or []):
        vae_dir = None  # the export has no vae_dec graph: nothing runs the VAE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rec = Recorder(backend, tmp)
        for name, image, question in tqdm(inputs.pairs, desc="calib chat", disable=not progress):
            rec.source, rec.active = f"chat:{name}", {"siglip", "embed", "llm"}
            record_chat(rec, cfg, processor, image, question, CHAT_TOKENS, plan.decode_stride)
        release(backend, CHAT_ONLY)
        n = len(inputs.prompts)
        for p, prompt in enumerate(tqdm(inputs.prompts, desc="calib t2i", disable=not progress)):
            full = p < plan.full_runs
            keep = plan.kept_steps(p)
            rec.source, rec.active = f"t2i:{p}", ({"embed", "llm"} if full else set())
            z = record_t2i(rec, cfg, processor, prompt, initial_latents(1, seed=1000 + p), plan.steps,
                           plan.cfg_weight, keep, plan.steps if full else max(keep) + 1, f"t2i:{p}")
            if full and vae_dir is not None:
                rec.source, rec.active = f"t2i:{p}:final", {"vae_dec"}
                text2img.vae_decode(rec, z)
        rec.active = set()
        index = {"recorder_version": RECORDER_VERSION, "key": key, "backend": runner,
                 "plan": plan.__dict__, "inputs_sha256": given_sha,
                 "recorded_inputs_sha256": inputs.sha256(),
                 "num_prompts": n, "num_pairs": len(inputs.pairs), "files": rec.files}
        index["sha256"] = hashlib.sha256(json.dumps(rec.files, sort_keys=True).encode()).hexdigest()
        index["bytes"] = sum((tmp / f["file"]).stat().st_size for f in rec.files)
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index
