"""`janusflow quality`: a precision vs FP32 on the same backend, on held-out inputs (calibration/data.py
keeps them apart from the calibration set), per graph and end to end. Writes quality.json, quality.md and
quality.png (rows: prompts; columns: FP32 | each precision).

Both sides are runtime backends by registry name (runtime/factory.make_backend), the reference at fp32:
ort for the exported variants (fp16, int8, int8-cpu), torch-fast for bf16 (the torch backends' dtype,
from the checkpoint; no export needed). Every loop below is the runtime's own, whichever backend runs it.

- per graph: the FP32 runtime's actual inputs during the held-out runs below (recorded as in
  calibration, fewer calls), through each backend's run of the FP32 and the other graph: worst max abs /
  max rel / cosine. Exported variants: the graph files in the backend's own sessions (those the loops
  ran); torch backends: the graph modules (BF16 vs FP32 modules), so a BF16 loss is located per graph as
  an exported one is;
- chat: per held-out (photo, question) pair, the FP32 greedy answer (N new tokens); the other
  precision with that answer fed back (teacher forcing): top-1 agreement; and free-running greedy:
  agreement and first divergence;
- text-to-image: per held-out prompt, the same initial latents through both: final-latent cosine,
  image PSNR (uint8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from janusflow_trt.calibration.data import InputSet, builtin_heldout
from janusflow_trt.calibration.record import RECORDER_VERSION, CalibrationData
from janusflow_trt.errors import InputError
from janusflow_trt.export.manifest import gate_lines
from janusflow_trt.export.quality_metrics import (
    agreement,
    bf16_spacing,
    cosine,
    first_divergence,
    psnr,
    tensor_metrics,
    top2_margin,
    worst,
)
from janusflow_trt.export.specs import VIEWS
from janusflow_trt.files import check_output_dir, owned_tempdir, write_into
from janusflow_trt.images import to_uint8
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.janusflow_ref.generation import initial_latents
from janusflow_trt.janusflow_ref.processor import Processor
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.vae import resolve_vae_dir
from janusflow_trt.precision import Precision
from janusflow_trt.runtime import text2img
from janusflow_trt.runtime.backends import Backend, read_manifest, release
from janusflow_trt.runtime.chat import CHAT_ONLY, chat_prefill
from janusflow_trt.runtime.decode import Decoder, decode_tokens
from janusflow_trt.runtime.factory import make_backend
from janusflow_trt.runtime.kv_cache import KVCache
from janusflow_trt.runtime.llm import new_cache
from janusflow_trt.runtime.registry import BACKENDS, check_request

from .recording import Recorder, record_t2i

TARGETS = {"fp16": {"latent_cosine": 0.9995, "psnr_db": 45.0, "chat_top1_teacher_forced": 0.99},
           **{p: {"latent_cosine": 0.995, "psnr_db": 35.0, "chat_top1_teacher_forced": 0.90, "graph_cosine": 0.995}
              for p in ("int8", "int8-cpu")},
           "bf16": {"latent_cosine": 0.9995, "psnr_db": 45.0, "chat_top1_teacher_forced": 0.98}}  # issue 25
# precisions whose logits are rounded on the way out (the BF16 backend's LM head returns BF16 values, cast
# to FP32 after): the spacing of that rounding, the margin below which two logits are a tie to it
ROUNDED_LOGITS = {"bf16": bf16_spacing}
GRAPH_STEPS = (0, 10, 20, 29)  # Euler steps whose graph inputs the per-graph comparison uses
# per graph, by whether the backend runs an export (BackendInfo.needs_artifacts)
GRAPHS_COMPARED = {True: "the exported graph files through each backend's run",
                   False: "the graph modules through each backend's run"}


@dataclass
class ChatRun:
    """One greedy chat pass (chat_run): the pick at every position, the logits behind them [T, V] FP32, and
    the free-running greedy answer."""
    picks: list[int]
    logits: np.ndarray
    answer: list[int]


def chat_run(backend: Backend, cfg, prefilled: tuple[KVCache, torch.Tensor], tokens: int, eos_id: int,
             ref: list[int] | None = None) -> ChatRun:
    """The runtime's greedy decode step (runtime/decode.py: Decoder) after a chat prefill (chat_prefill's cache
    and logits), the pick and the logits kept at every position.
    ref None: free-running, the runtime's loop itself (decode_tokens: up to `tokens`, through EOS; non-finite
    logits are one InputError line) with its logits kept: picks and answer are one list.
    ref given: teacher forcing (ref's token fed back at every position: len(ref) picks; a sampler sentinel,
    non-finite logits, counts as a disagreement). The free-running answer needs no second prefill: up to
    the first pick that disagrees with ref, both runs saw the same inputs, so it is those picks (all of ref
    when none disagrees, ref being a greedy answer under the same `tokens` and EOS); from there it continues
    through the runtime's loop (decode_tokens) from a copy of the cache and logits taken at that pick."""
    cache, logits = prefilled
    rows: list[torch.Tensor] = []
    if ref is None:
        answer = list(decode_tokens(backend, cache, logits, SamplingParams(max_new_tokens=tokens), eos_id, rows))
        return ChatRun(answer, torch.cat(rows).numpy(), answer)
    dec = Decoder(backend, cache, logits, SamplingParams())
    picks: list[int] = []
    fork = None
    for i, tok in enumerate(ref):
        if i:
            dec.ids.fill_(ref[i - 1])
            dec.step()
        picks.append(int(dec.ids))
        rows.append(dec.logits.to("cpu", torch.float32, copy=True))  # a buffer the next step reuses
        if fork is None and picks[i] != tok:
            snap = new_cache(backend, cfg, 1, cache.capacity, exact=True)
            snap.fill_row(0, cache)
            fork = (i, snap, dec.logits.clone())
    if fork is None:
        answer = list(ref)
    else:
        d, snap, last = fork
        answer = picks[:d] + list(decode_tokens(backend, snap, last, SamplingParams(max_new_tokens=tokens - d),
                                                eos_id))
    return ChatRun(picks, torch.cat(rows).numpy(), answer)


def teacher_forced(backend: Backend, cfg, processor, image, question: str, ref: list[int]
                   ) -> tuple[list[int], np.ndarray]:
    """The greedy pick of `backend` at every position of the reference answer, given the reference
    prefix (chat_run with ref). -> (picks, the logits behind them [T, V] FP32)."""
    prefilled = chat_prefill(backend, cfg, processor.chat_inputs(image, question), capacity=len(ref))
    run = chat_run(backend, cfg, prefilled, len(ref), processor.eos_id, ref)
    return run.picks, run.logits


def teacher_forced_top1(backend: Backend, cfg, processor, image, question: str, ref: list[int]) -> list[int]:
    return teacher_forced(backend, cfg, processor, image, question, ref)[0]


def margin_rows(tf: list[int], ref: list[int], logits32: np.ndarray, precision: str) -> dict[str, Any]:
    """Where the teacher-forced picks disagree, the FP32 top-1/top-2 margin there ([position, margin]);
    for a precision whose logits leave the graph rounded (ROUNDED_LOGITS: bf16), the positions whose FP32
    margin exceeds that rounding's spacing at the top logit (`decidable`: the rounded logits can still
    order the two) and how many of them agree. A diagnostic beside the raw top-1, not a target."""
    margin = top2_margin(logits32)
    out: dict[str, Any] = {"fp32_margin_at_disagreements": [[i, float(margin[i])] for i, (a, b)
                                                           in enumerate(zip(tf, ref, strict=True)) if a != b]}
    if precision in ROUNDED_LOGITS:
        ok = margin > ROUNDED_LOGITS[precision](logits32.max(-1))
        out["decidable"] = int(ok.sum())
        out["decidable_agree"] = int(sum(o and a == b for o, a, b in zip(ok, tf, ref, strict=True)))
    return out


def _t2i(rec: Recorder, cfg, processor, prompt: str, z0: torch.Tensor, steps: int, keep: set[int],
         cfg_weight: float = 2.0):
    """The runtime's text-to-image from z0 (CFG cfg_weight), the prefix, the steps in `keep` and the VAE
    call recorded when `keep` is not empty. -> (final latents, pixels) as numpy."""
    rec.active = {"embed", "llm"} if keep else set()
    z = record_t2i(rec, cfg, processor, prompt, z0, steps, cfg_weight, keep, steps, "quality")
    rec.active = {"vae_dec"} if keep else set()
    img = text2img.vae_decode(rec, z).cpu().numpy().copy()
    rec.active = set()
    return z.cpu().numpy(), img


@dataclass
class Reference:
    """The FP32 side of a comparison, run once: each held-out pair's greedy answer, each prompt's seeded
    latents and final latents / pixels per CFG weight, and the FP32 run's recorded graph inputs."""
    chats: list[tuple[str, Any, str, list[int], np.ndarray]]  # name, image, question, answer, its FP32 logits
    t2i: dict[float, list[tuple[str, torch.Tensor, np.ndarray, np.ndarray]]]
    data: CalibrationData
    tokens: int
    steps: int


def reference(b32: Backend, cfg, processor, held: InputSet, tokens: int, steps: int, tmp: Path,
              cfgs: tuple[float, ...] = (2.0,), progress: bool = True) -> Reference:
    """Run the held-out inputs through the FP32 backend (the runtime's loops), recording into tmp the
    graph inputs of the chat prefills and of GRAPH_STEPS at the first CFG weight."""
    rec = Recorder(b32, tmp)
    chats = []
    for name, image, q in tqdm(held.pairs, desc="quality chat fp32", disable=not progress):
        rec.active = {"siglip", "embed", "llm"}  # the prefill calls; decode calls are not kept
        prefilled = chat_prefill(rec, cfg, processor.chat_inputs(image, q), capacity=tokens)
        rec.active = set()
        run = chat_run(rec, cfg, prefilled, tokens, processor.eos_id)  # the answer and its FP32 margins
        chats.append((name, image, q, run.answer, run.logits))
    release(b32, CHAT_ONLY)
    t2i: dict[float, list] = {w: [] for w in cfgs}
    for i, prompt in enumerate(tqdm(held.prompts, desc="quality t2i fp32", disable=not progress)):
        z0 = initial_latents(1, seed=2000 + i)
        for w in cfgs:
            keep = set(GRAPH_STEPS) if w == cfgs[0] else set()
            z32, img32 = _t2i(rec if keep else Recorder(b32, tmp), cfg, processor, prompt, z0, steps, keep, w)
            t2i[w].append((prompt, z0, z32, img32))
    return Reference(chats, t2i, _as_calibration(rec, tmp), tokens, steps)


def compare(b: Backend, ref: Reference, cfg, processor, tmp: Path, progress: bool = True,
            precision: str = "") -> tuple[dict[str, Any], dict[float, list[np.ndarray]]]:
    """One backend vs the FP32 reference, end to end: chat teacher-forced top-1 and free-running greedy
    agreement per pair; final-latent cosine and image PSNR per prompt and CFG weight, from the same
    initial latents. -> ({"chat": summary, "t2i": {cfg: summary}}, {cfg: uint8 images})."""
    chats = []
    for name, image, q, r, logits32 in tqdm(ref.chats, desc=f"quality chat {precision}", disable=not progress):
        # one prefill for both figures, with the reference's cache capacity (chat_run)
        prefilled = chat_prefill(b, cfg, processor.chat_inputs(image, q), capacity=ref.tokens)
        run = chat_run(b, cfg, prefilled, ref.tokens, processor.eos_id, r)
        tf, free = run.picks, run.answer
        chats.append({"pair": name, "question": q, "fp32_tokens": r, "tokens": free,
                      "teacher_forced_top1": agreement(tf, r), "free_agreement": agreement(free, r),
                      "first_divergence": first_divergence(free, r), **margin_rows(tf, r, logits32, precision)})
    release(b, CHAT_ONLY)
    t2i: dict[float, dict[str, Any]] = {}
    images: dict[float, list[np.ndarray]] = {}
    for w, runs in ref.t2i.items():
        rows, images[w] = [], []
        for prompt, z0, z32, img32 in tqdm(runs, desc=f"quality t2i {precision} cfg {w:g}", disable=not progress):
            zp, imgp = _t2i(Recorder(b, tmp), cfg, processor, prompt, z0, ref.steps, set(), w)
            u32, up = to_uint8(img32)[0], to_uint8(imgp)[0]
            rows.append({"prompt": prompt, "latent_cosine": cosine(zp, z32), "psnr_db": psnr(up, u32),
                         "finite": bool(np.isfinite(zp).all() and np.isfinite(imgp).all())})
            images[w].append(up)
        t2i[w] = _summary_t2i(rows)
    return {"chat": _summary_chat(chats), "t2i": t2i}, images


OUTPUTS = ("quality.json", "quality.md", "quality.png")


def parse_precisions(s: str) -> list[str]:
    """`--precision`: the precisions to compare with fp32 (fp32 itself dropped), in the enum's order."""
    names = {p.strip() for p in s.split(",") if p.strip()}
    bad = sorted(names - set(Precision))
    if bad:
        raise InputError(f"--precision: unknown precision {bad[0]!r}; choose from {','.join(Precision)}")
    out = [p.value for p in Precision if p in names and p != Precision.FP32]
    if not out:
        raise InputError("--precision: name a precision to compare with fp32 (e.g. fp16)")
    return out


def quality_backend(precisions: list[str], artifacts: str | Path | None, backend: str | None = None) -> str:
    """The backend that runs both sides, FP32 and each precision (refused in one line where it does not
    run one of them, or needs --artifacts that were not given). None: the CPU backend that runs them (ort
    for the exported variants, torch-fast for bf16); a list that needs two is refused, since each is
    compared with its own backend's FP32 and the report has one FP32 column."""
    if backend is None:
        runs = {p: next(b.name for b in BACKENDS.values() if not b.gpu and p in b.precisions) for p in precisions}
        if len(set(runs.values())) > 1:
            raise InputError(f"--precision {','.join(precisions)}: "
                             + ", ".join(f"{p} runs on {b}" for p, b in runs.items())
                             + "; each is compared with its own backend's fp32: run quality once per backend")
        backend = runs[precisions[0]]
    for p in (Precision.FP32, *precisions):
        check_request(backend, p, artifacts)
    return backend


def run_quality(model_dir: str | Path, artifacts: str | Path | None, precisions: list[str], out: str | Path,
                heldout: InputSet | None = None, tokens: int = 32, steps: int = 30,
                progress: bool = True, force: bool = False, backend: str | None = None) -> dict[str, Any]:
    """-> the report; OUT/quality.{json,md,png} are checked before the work (an existing one is replaced
    only with force) and renamed into place together at the end (janusflow_trt/files.py). backend: the
    registry name that runs both sides (None: quality_backend's choice)."""
    name = quality_backend(precisions, artifacts, backend)
    out = check_output_dir(out, "--out", force, OUTPUTS)
    cfg, processor = load_config(model_dir), Processor(model_dir)
    held = heldout or builtin_heldout()
    exported = BACKENDS[name].needs_artifacts  # the VAE is among the artifacts; else MODEL/vae
    vae_dir = None if exported else resolve_vae_dir(model_dir, None)

    def load(p: str) -> Backend:  # refuses a precision the artifacts lack
        return make_backend(name, model_dir, artifacts, cfg, vae_dir=vae_dir, precision=p)

    others = {p: load(p) for p in precisions}  # first: a refusal (CPU without BF16, precision not exported)
    b32 = load(Precision.FP32)                   # comes before the FP32 weights are loaded
    report: dict[str, Any] = {"precisions": precisions, "backend": name, "tokens": tokens, "steps": steps,
                              "graphs_compared": GRAPHS_COMPARED[exported],
                              "heldout_sha256": held.sha256(), "chat": {}, "t2i": {}, "graphs": {}}
    with owned_tempdir("janusflow-quality") as tmp:  # removed on every exit path
        ref = reference(b32, cfg, processor, held, tokens, steps, Path(tmp), progress=progress)
        ref_out = reference_outputs(b32, ref.data, Path(tmp) / "fp32-outputs")
        images: list[list[np.ndarray]] = [[to_uint8(img32)[0]] for _, _, _, img32 in ref.t2i[2.0]]
        for p in precisions:
            r, imgs = compare(others[p], ref, cfg, processor, Path(tmp), progress, p)
            for row, img in zip(images, imgs[2.0], strict=True):
                row.append(img)
            report["graphs"][p] = per_graph(others[p], ref.data, ref_out)
            report["chat"][p] = r["chat"]
            report["t2i"][p] = r["t2i"][2.0]
    report["targets"] = {p: _targets(report, p) for p in precisions}
    if exported and artifacts is not None:  # what the export's own gate measured, beside this run's figures
        m = read_manifest(artifacts, cfg)
        report["export_gate"] = {p: gate_lines(m, p) for p in precisions}
    write_into(out, [("quality.json", lambda t: Path(t).write_text(json.dumps(report, indent=1))),
                     ("quality.md", lambda t: Path(t).write_text(markdown(report))),
                     ("quality.png", lambda t: _grid(images, ["fp32", *precisions], held.prompts, Path(t)))])
    return report


def _as_calibration(rec: Recorder, path: Path) -> CalibrationData:
    (path / "index.json").write_text(json.dumps({"recorder_version": RECORDER_VERSION, "files": rec.files,
                                                 "sha256": ""}))
    return CalibrationData(path)


def _graph_runs(b: Backend, data: CalibrationData):
    """Each graph of `b` that `data` recorded, on each of its recorded feeds (cast to b's input dtypes), through
    b.run (an exported variant: its file in the backend's own session; a torch backend: its module) ->
    (graph, sample index, {output: float32 numpy}), valid until the next step (an ORT backend reuses its
    output buffers). Every other graph is released first (runtime/backends.release): one session alive at a
    time. The LLM comes first (a text-to-image loop leaves its session loaded: reused, at full size 5.4 GB
    and ~8 s not loaded again), the chat-only graphs (SigLIP) last."""
    graphs = [n for n in b.specs if n not in VIEWS]  # a view's calls are recorded as its parent's
    for name in sorted([n for n in graphs if data.count(n)], key=lambda n: (n != "llm", n in CHAT_ONLY)):
        release(b, [g for g in graphs if g != name])
        spec = b.specs[name]
        for i, feeds in enumerate(data.samples(name)):
            x = {t.name: torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(b.device, getattr(torch, t.dtype))
                 for t in spec.inputs}
            y = b.run(name, x)
            yield name, i, {o: y[o].float().cpu().numpy() for o in spec.output_names}
    release(b, graphs)


def reference_outputs(b32: Backend, data: CalibrationData, d: Path) -> dict[str, list[list[Path]]]:
    """The FP32 backend's graph outputs on data's recorded feeds (_graph_runs), written once as
    d/<graph>/<sample>.<output index>.npy: every variant (and every round of the gate's search) is compared
    with these files, read back memory-mapped. -> graph -> per sample, its output files."""
    files: dict[str, list[list[Path]]] = {}
    for name, i, outs in _graph_runs(b32, data):
        (d / name).mkdir(parents=True, exist_ok=True)
        files.setdefault(name, []).append([d / name / f"{i}.{j}.npy" for j in range(len(outs))])
        for f, y in zip(files[name][i], outs.values(), strict=True):
            np.save(f, y)
    return files


def per_graph(b: Backend, data: CalibrationData, ref: dict[str, list[list[Path]]]) -> dict[str, Any]:
    """Each graph of `b` vs the FP32 outputs `ref` (reference_outputs) on the same recorded feeds: the worst
    max abs / max rel / cosine per output."""
    per_out: dict[str, dict[str, list]] = {}
    for name, i, outs in _graph_runs(b, data):
        rows = per_out.setdefault(name, {o: [] for o in outs})
        for (o, y), f in zip(outs.items(), ref[name][i], strict=True):
            rows[o].append(tensor_metrics(y, np.load(f, mmap_mode="r")))
    return {name: {o: worst(v) for o, v in rows.items()} for name, rows in per_out.items()}


def _summary_chat(rows: list[dict]) -> dict[str, Any]:
    divs = [r["first_divergence"] for r in rows]
    return {"pairs": rows, "teacher_forced_top1": float(np.mean([r["teacher_forced_top1"] for r in rows])),
            "teacher_forced_top1_min": min(r["teacher_forced_top1"] for r in rows),
            "free_agreement": float(np.mean([r["free_agreement"] for r in rows])),
            "identical_answers": sum(d is None for d in divs),
            "first_divergence_min": min((d for d in divs if d is not None), default=None),
            "fp32_margin_at_disagreements": [m for r in rows for _, m in r["fp32_margin_at_disagreements"]],
            **{k: sum(r[k] for r in rows) for k in ("decidable", "decidable_agree") if k in rows[0]}}


def _summary_t2i(rows: list[dict]) -> dict[str, Any]:
    return {"prompts": rows, "latent_cosine_min": min(r["latent_cosine"] for r in rows),
            "psnr_db_min": min(r["psnr_db"] for r in rows), "finite": all(r["finite"] for r in rows)}


def _targets(report: dict, p: str) -> dict[str, Any]:
    t = TARGETS.get(p, {})
    c, g = report["chat"][p], report["t2i"][p]
    graphs_finite = all(o["finite"] for outs in report["graphs"][p].values() for o in outs.values())
    checks = {"latent_cosine": bool(g["latent_cosine_min"] >= t.get("latent_cosine", 0)),
              "psnr_db": bool(g["psnr_db_min"] >= t.get("psnr_db", 0)),
              "chat_top1_teacher_forced": bool(c["teacher_forced_top1_min"]
                                               >= t.get("chat_top1_teacher_forced", 0)),
              "all_finite": bool(g["finite"] and graphs_finite)}
    if "graph_cosine" in t:  # every output of every graph on held-out inputs
        checks["graph_cosine"] = bool(min(o["cosine"] for outs in report["graphs"][p].values()
                                          for o in outs.values()) >= t["graph_cosine"])
    return {"thresholds": t, "met": checks, "all_met": all(checks.values())}


def markdown(r: dict) -> str:
    lines = [f"# Quality vs FP32 (held-out inputs; {r['tokens']} chat tokens, {r['steps']} Euler steps)", "",
             f"Both sides on `{r['backend']}` (reference: its fp32). Per graph: {r['graphs_compared']}, on the "
             "FP32 run's recorded inputs.", ""]
    for p in r["precisions"]:
        c, g, t = r["chat"][p], r["t2i"][p], r["targets"][p]
        lines += [f"## {p}", "", "| end to end | value | target |", "|---|---|---|",
                  f"| final-latent cosine (min over {len(g['prompts'])} prompts) | {g['latent_cosine_min']:.6f} | "
                  f">= {t['thresholds'].get('latent_cosine', '-')} |",
                  f"| image PSNR dB (min) | {g['psnr_db_min']:.2f} | >= {t['thresholds'].get('psnr_db', '-')} |",
                  f"| chat top-1, teacher forced (min over {len(c['pairs'])} pairs) | "
                  f"{c['teacher_forced_top1_min']:.4f} | >= {t['thresholds'].get('chat_top1_teacher_forced', '-')} |",
                  f"| chat free-running agreement (mean) | {c['free_agreement']:.4f} | |",
                  f"| answers identical / first divergence (min) | {c['identical_answers']}/{len(c['pairs'])} / "
                  f"{c['first_divergence_min']} | |",
                  f"| FP32 top-1/top-2 margin at the teacher-forced disagreements | "
                  f"{', '.join(f'{m:.4f}' for m in c['fp32_margin_at_disagreements']) or '-'} | |",
                  *([f"| chat top-1, teacher forced, at positions whose FP32 margin exceeds one {p.upper()} spacing "
                     f"of the top logit (diagnostic: below it the {p.upper()} logits tie) | {c['decidable_agree']}/"
                     f"{c['decidable']} | |"] if "decidable" in c else []),
                  f"| all outputs finite | {t['met']['all_finite']} | yes |", "",
                  f"targets met: **{_met(t)}**",
                  "", "| graph | output | max abs | max rel | cosine | finite | samples |",
                  "|---|---|---|---|---|---|---|"]
        for name, outs in r["graphs"][p].items():
            for o, m in outs.items():
                lines.append(f"| {name} | {o} | {m['max_abs']:.3e} | {m['max_rel']:.3e} | {m['cosine']:.7f} | "
                             f"{m['finite']} | {m['samples']} |")
        lines.append("")
    return "\n".join(lines)


def _met(t: dict) -> str:
    return "yes" if t["all_met"] else "NO: " + ", ".join(k for k, v in t["met"].items() if not v)


def summary_lines(r: dict) -> list[str]:
    out = []
    for p in r["precisions"]:
        c, g, t = r["chat"][p], r["t2i"][p], r["targets"][p]
        out.append(f"{p}: latent cosine min {g['latent_cosine_min']:.6f}, PSNR min {g['psnr_db_min']:.2f} dB, "
                   f"chat top-1 (teacher forced) min {c['teacher_forced_top1_min']:.4f}, free-running agreement "
                   f"{c['free_agreement']:.4f}; targets met: {'yes' if t['all_met'] else 'NO'}")
        out += [f"  at export: {line}" for line in r.get("export_gate", {}).get(p, [])]
    return out


def _grid(rows: list[list[np.ndarray]], labels: list[str], prompts, path: Path) -> None:
    h, w = rows[0][0].shape[:2]
    head = 20
    grid = Image.new("RGB", (w * len(labels), head + h * len(rows)), "white")
    d = ImageDraw.Draw(grid)
    for j, lab in enumerate(labels):
        d.text((j * w + 4, 4), lab, fill="black")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(Image.fromarray(img), (j * w, head + i * h))
    grid.save(path)
