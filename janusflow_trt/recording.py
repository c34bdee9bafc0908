"""Calibration recording: the runtime's own chat and text-to-image loops on the FP32 torch-fast backend,
with a Recorder (calibration/record.py) wrapped around the seam; what is kept is the Plan's choice.
It runs pipelines, so it lives above the runtime; calibration/ only reads what it writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from janusflow_trt.calibration.data import InputSet
from janusflow_trt.calibration.record import CHAT_TOKENS, RECORDER_VERSION, Plan, Recorder, recording_key, subset


def record(model_dir: str | Path, vae_dir: str | Path | None, out: str | Path, inputs: InputSet,
           plan: Plan = Plan(), progress: bool = True) -> dict[str, Any]:
    """Run chat and text-to-image on the FP32 torch-fast runtime; write DIR atomically; -> index."""
    from tqdm import tqdm

    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.janusflow_ref.generation import initial_latents
    from janusflow_trt.janusflow_ref.processor import Processor
    from janusflow_trt.janusflow_ref.sampling import SamplingParams
    from janusflow_trt.runtime import text2img
    from janusflow_trt.runtime.backends import make_backend
    from janusflow_trt.runtime.chat import chat

    model_dir, out = Path(model_dir), Path(out)
    vae_dir = Path(vae_dir) if vae_dir is not None else None
    key, given_sha = recording_key(model_dir, vae_dir, inputs, plan), inputs.sha256()
    inputs = subset(inputs, plan)
    cfg = load_config(model_dir)
    processor = Processor(model_dir)
    backend = make_backend("torch-fast", model_dir, None, cfg, need_vae=vae_dir is not None, vae_dir=vae_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rec = Recorder(backend, tmp)
        params = SamplingParams(temperature=0.0, max_new_tokens=CHAT_TOKENS)
        for name, image, question in tqdm(inputs.pairs, desc="calib chat", disable=not progress):
            rec.source, rec.active = f"chat:{name}", {"siglip", "embed", "llm"}
            seen = {"n": 0}

            def after_prefill(tok: int, seen=seen) -> None:  # decode calls: every decode_stride-th token
                seen["n"] += 1
                rec.active = {"llm"} if seen["n"] % plan.decode_stride == 0 else set()

            chat(rec, cfg, processor, image, question, params, on_token=after_prefill)
        n = len(inputs.prompts)
        for p, prompt in enumerate(tqdm(inputs.prompts, desc="calib t2i", disable=not progress)):
            full = p < plan.full_runs
            keep = plan.kept_steps(p)
            rec.source, rec.active = f"t2i:{p}", ({"embed", "llm"} if full else set())
            cache = text2img.prefill_prefix(rec, cfg, processor, prompt, 1)
            z0 = initial_latents(1, seed=1000 + p).numpy()
            loop = text2img.euler_loop(rec, cache, z0, plan.steps, plan.cfg_weight)
            z = z0
            for step in range(plan.steps if full else max(keep) + 1):
                rec.source = f"t2i:{p}:step{step}"
                rec.active = {"gen_enc", "llm", "gen_dec"} if step in keep else set()
                z = next(loop)
            loop.close()
            if full and vae_dir is not None:
                rec.source, rec.active = f"t2i:{p}:final", {"vae_dec"}
                text2img.vae_decode(rec, z)
        rec.active = set()
        index = {"recorder_version": RECORDER_VERSION, "key": key,
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
