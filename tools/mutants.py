"""Mutation check: plant one-line numerics bugs, one at a time, in a TEMPORARY copy of the tree and
run the test suite there; a mutant is killed when the suite fails. Never touches the working tree.

    python tools/mutants.py [--baseline] [--only ID,ID] [--json out.json]   (make mutation; not in CI: minutes a mutant)

Each mutant replaces one exact snippet that must occur exactly once in its file (so a refactor that
removes it shows up as an error, not as a silent pass). Tests run fast files first with -x, so a
killed mutant stops at its first failing test, which is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# fast files first: -x stops at the first failure
TEST_ORDER = ["tests/test_blocks.py", "tests/test_processor.py", "tests/test_buffers.py", "tests/test_pipelines.py",
              "tests/test_golden.py", "tests/test_gqa.py", "tests/test_runtime_ort.py", "tests/test_export.py", "tests"]


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    old: str
    new: str
    what: str
    first: tuple[str, ...] = ()  # tests likely to kill it, run first (the whole order follows)


def M(id: str, path: str, old: str, new: str, what: str, *first: str) -> Mutant:  # noqa: A002
    return Mutant(id, path, old, new, what, tuple(first))


G, P = "tests/test_golden.py::", "tests/test_pipelines.py::"
CHAT_RT = P + "test_runtime_chat_equals_reference"
STEPS_RT = P + "test_prefix_reuse_equals_full_recompute"
ROWS_RT = P + "test_cfg_rows_attend_as_official"
STEPS_REF, STEP0_REF = G + "test_first_euler_steps[torch]", G + "test_step0_t_emb_and_velocities[torch]"
TOK_BROAD, TOK_DEMO = G + "test_chat_tokens_exact[torch-broad]", G + "test_chat_tokens_exact[torch-demo]"
ROWS_GOLD = G + "test_generation_prompt_rows_mask_schedule_noise"
PIX, PROC = G + "test_chat_prompt_and_pixels", "tests/test_processor.py"
SIGLIP_REF = G + "test_siglip_and_spliced_embeddings[torch]"

MUTANTS = [
    # the four bugs of issue 8
    M("skip-order", "janusflow_ref/uvit.py", "torch.cat([channels_last_norm(self.input_norm, x), skip], dim=1)",
      "torch.cat([skip, channels_last_norm(self.input_norm, x)], dim=1)", "decoder skip concatenated first"),
    M("uncond-unmasked", "janusflow_ref/generation.py", "mask[num_images:, 1:prefix_len] = 0",
      "mask[num_images:, 1:prefix_len] = 1", "uncond CFG rows see the pads", ROWS_RT),
    M("t-no-1000", "janusflow_ref/generation.py", "return step / steps * 1000.0", "return step / steps",
      "timestep without x1000", STEPS_REF),
    M("top-k-0", "janusflow_ref/sampling.py", "DEFAULT_TOP_K = 50", "DEFAULT_TOP_K = 0", "no top-k 50", TOK_BROAD),
    # mask, rows, positions
    M("mask-bos", "janusflow_ref/generation.py", "mask[num_images:, 1:prefix_len] = 0",
      "mask[num_images:, 0:prefix_len] = 0", "uncond rows lose BOS too", ROWS_RT),
    M("uncond-tokens", "janusflow_ref/generation.py", "tokens[num_images:, 1:] = pad_id",
      "tokens[num_images:, 2:] = pad_id", "uncond rows keep the first prompt token", ROWS_GOLD),
    M("prefix-drop", "janusflow_ref/generation.py", "return tokens, tokens[:, :-1]", "return tokens, tokens[:, 1:]",
      "runtime prefix drops BOS instead of <begin_of_image>", STEPS_RT),
    # the runtime's one KV cache and its step functions (what every caller runs)
    M("positions-arange", "runtime/llm.py", "torch.arange(start, start + s,", "torch.arange(start + 1, start + s + 1,",
      "prefill / step positions off by one", CHAT_RT),
    M("positions-decode", "runtime/decode.py", "torch.full((1,), self.cache.lengths[r],",
      "torch.full((1,), self.cache.lengths[r] + 1,",
      "decode positions off by one", CHAT_RT),
    M("positions-step", "runtime/euler_step.py", "positions=starts + positions(0, rows, s, dev)",
      "positions=positions(0, rows, s, dev)", "Euler step tokens at positions 0.. (the prefix's)", STEPS_RT),
    M("kv-valid", "runtime/kv_cache.py", "self.valid[:, at:at + s] = new_mask", "self.valid[:, at:at + s] = 1",
      "cache forgets the prefix mask", ROWS_RT),
    M("decode-mask", "runtime/kv_cache.py", "self.decode_mask[:, cap] = 1", "self.decode_mask[:, cap] = 0",
      "decode token cannot see itself", CHAT_RT,
      "tests/test_runtime_ort.py::test_kv_cache_prefill_plus_decode_equals_one_forward"),
    M("kv-index", "runtime/kv_cache.py", "        self.index += live\n", "        self.index += 0\n",
      "every decode step overwrites the same slot", CHAT_RT),
    M("kv-grow", "runtime/kv_cache.py", "new[:, :, :n] = o[:, :, :n]", "new[:, :, :n - 1] = o[:, :, :n - 1]",
      "a bucket change loses the last slot",
      "tests/test_runtime_ort.py::test_kv_cache_prefill_plus_decode_equals_one_forward"),
    M("splice", "runtime/chat.py", "embeds[0, inputs.image_positions.to(dev)] = image[0]",
      "embeds[0, inputs.image_positions.to(dev) - 1] = image[0]", "image embeddings spliced one slot early", CHAT_RT),
    M("rope-pos", "export/graphs.py", "cos, sin = base.rotary_emb(inputs_embeds, position_ids)",
      "cos, sin = base.rotary_emb(inputs_embeds, position_ids + 1)", "rope shifted by one", CHAT_RT),
    M("rope-swap", "export/graphs.py", "q, k = apply_rotary_pos_emb(q, k, cos, sin)",
      "q, k = apply_rotary_pos_emb(q, k, sin, cos)", "rope cos/sin swapped", CHAT_RT),
    M("gqa-repeat", "export/graphs.py", "t.repeat_interleave(groups, dim=1) if groups > 1",
      "t.repeat(1, groups, 1, 1) if groups > 1", "KV heads tiled, not interleaved (GQA)", "tests/test_gqa.py"),
    M("buffers-turn", "runtime/backends.py", "entry[1] = 1 - turn", "entry[1] = turn",
      "one output buffer per graph instead of two in turn", "tests/test_buffers.py"),
    M("attn-scale", "export/graphs.py", "q = q * attn.scaling", "q = q", "decode attention unscaled", CHAT_RT),
    # CFG, Euler, timestep
    M("cfg-ref", "janusflow_ref/generation.py", "v = cfg_weight * v_cond - (cfg_weight - 1.0) * v_uncond",
      "v = cfg_weight * v_uncond - (cfg_weight - 1.0) * v_cond", "reference CFG with cond/uncond swapped", STEPS_REF),
    M("cfg-graph", "export/graphs.py", "return w * v_cond - (w - 1.0) * v_uncond", "return w * v_cond - w * v_uncond",
      "runtime CFG formula", STEPS_RT),
    M("euler-ref", "janusflow_ref/generation.py", "z = z + dt * v", "z = z - dt * v", "reference Euler -", STEPS_REF),
    M("euler-graph", "export/graphs.py", "return z + dt * v", "return z + v", "runtime Euler without dt", STEPS_RT),
    M("dt-runtime", "runtime/euler_step.py", "dt=torch.tensor([1.0 / steps]", "dt=torch.tensor([1.0 / (steps + 1)]",
      "runtime dt", STEPS_RT),
    M("t-runtime", "runtime/euler_step.py", "[[timestep(i, steps)] * rows", "[[timestep(i + 1, steps)] * rows",
      "runtime t one step ahead", STEPS_RT),
    M("t-write", "runtime/euler_step.py", "run.write(st.t, st.t_table[i])", "run.write(st.t, st.t_table[0])",
      "every step at the first timestep", STEPS_RT),
    M("carry", "runtime/euler_step.py", 'st.z.copy_(dec["z_next"])', 'st.z.copy_(dec["velocity"])',
      "the carry takes the velocity, not z + dt v", STEPS_RT),
    M("t-proj-order", "export/graphs.py", "t_proj = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
      "t_proj = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)", "graph t projection sin first", STEPS_RT),
    M("film", "janusflow_ref/uvit.py", "(1 + scale)[:, :, None, None]", "scale[:, :, None, None]",
      "FiLM without the 1 +", "tests/test_blocks.py::test_film_in_convnext_block"),
    M("dec-slice", "export/graphs.py", "hidden[:, -self.model.cfg.num_gen_tokens:]",
      "hidden[:, :self.model.cfg.num_gen_tokens]", "decoder reads t_emb's position", STEPS_RT),
    M("vae-scale", "export/graphs.py", "latents / self.scaling_factor", "latents * self.scaling_factor",
      "VAE scaling factor multiplied", "tests/test_runtime_ort.py::test_ort_generation_equals_reference"),
    M("vae-scale-ref", "janusflow_ref/generation.py", "vae.decode(z / vae.config.scaling_factor)",
      "vae.decode(z)", "reference VAE without scaling", G + "test_vae_decode_of_the_official_latents[torch]"),
    # norms
    M("rms-eps-patch", "export/patches.py", "x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon",
      "x.pow(2).mean(-1, keepdim=True) + 1e-2", "exported RMSNorm eps 1e-2",
      "tests/test_export.py::test_export_and_verify_pass"),
    M("rms-eps-aligner", "janusflow_ref/model.py", "LlamaRMSNorm(h, eps=cfg.llm.rms_norm_eps)",
      "LlamaRMSNorm(h, eps=1e-5)", "aligner RMSNorm eps 1e-5 (config: 1e-6)", STEP0_REF),
    M("grn-eps", "janusflow_ref/uvit.py", "nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)",
      "nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-3)", "GRN eps", "tests/test_blocks.py::test_grn_formula"),
    M("siglip-ln-eps", "janusflow_ref/siglip.py", "self.norm = nn.LayerNorm(cfg.width, eps=1e-6)",
      "self.norm = nn.LayerNorm(cfg.width, eps=1e-5)", "SigLIP final LayerNorm eps 1e-5", SIGLIP_REF),
    # understanding embeddings
    M("beg-order", "janusflow_ref/model.py", "torch.cat([beg.to(feats.dtype), feats], dim=1)",
      "torch.cat([feats, beg.to(feats.dtype)], dim=1)", "begin-of-understanding after the patches", SIGLIP_REF),
    # preprocessing
    M("resize", "janusflow_ref/processor.py", "img.resize((new_w, new_h), Image.Resampling.BICUBIC)",
      "img.resize((new_w, new_h), Image.Resampling.BILINEAR)", "bilinear resize", PIX, PROC),
    M("pad-colour", "janusflow_ref/processor.py", "tuple(int(x * 255) for x in self.image_mean)",
      "tuple(round(x * 255) for x in self.image_mean)", "pad colour rounded, not truncated", PIX, PROC),
    M("pad-centre", "janusflow_ref/processor.py", "out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))",
      "out.paste(img, (0, 0))", "image pasted in the corner", PIX, PROC),
    M("rescale", "janusflow_ref/processor.py", "rescale(x, cfg.rescale_factor,", "rescale(x, 1.0 / 256,",
      "rescale by 1/256", PIX, PROC),
    M("normalise-off", "janusflow_ref/processor.py", "    if cfg.do_normalize:\n", "    if not cfg.do_normalize:\n",
      "normalisation skipped", PIX, PROC),
    M("normalise-swap", "janusflow_ref/processor.py", "normalize(x, cfg.image_mean, cfg.image_std,",
      "normalize(x, cfg.image_std, cfg.image_mean,", "mean and std swapped", PIX, PROC),
    # template
    M("sep", "janusflow_ref/processor.py", 'SEP, SEP2 = "\\n\\n",', 'SEP, SEP2 = "\\n",', "template separator",
      PROC, PIX),
    M("role-space", "janusflow_ref/processor.py", 'f"{role}: {message}', 'f"{role}:{message}',
      "no space after the role", PROC, PIX),
    M("gen-boi", "janusflow_ref/processor.py", '("Assistant", "")], "") + self.image_start_tag',
      '("Assistant", "")], "")', "generation prompt without <begin_of_image>", PROC, ROWS_GOLD),
    # sampling
    M("sample-unwarped", "janusflow_ref/sampling.py", "probs = torch.softmax(warp(logits, p), dim=-1)",
      "probs = torch.softmax(logits, dim=-1)", "sampling ignores temperature/top-k/top-p", TOK_DEMO),
    M("sample-order", "janusflow_ref/sampling.py",
      "    if p.temperature != 1.0:\n        scores = TemperatureLogitsWarper(p.temperature)(None, scores)\n"
      "    if p.top_k:\n        scores = TopKLogitsWarper(top_k=p.top_k, min_tokens_to_keep=1)(None, scores)\n"
      "    if p.top_p < 1.0:\n        scores = TopPLogitsWarper(top_p=p.top_p, min_tokens_to_keep=1)(None, scores)\n",
      "    if p.top_k:\n        scores = TopKLogitsWarper(top_k=p.top_k, min_tokens_to_keep=1)(None, scores)\n"
      "    if p.top_p < 1.0:\n        scores = TopPLogitsWarper(top_p=p.top_p, min_tokens_to_keep=1)(None, scores)\n"
      "    if p.temperature != 1.0:\n        scores = TemperatureLogitsWarper(p.temperature)(None, scores)\n",
      "temperature applied after top-k/top-p (a reordering, not one line)", TOK_DEMO),
]


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_symlink():  # janusflow_trt/<folder> -> ../<folder>: the namespace must see the mutated copy
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst / f)
        elif src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def apply(tree: Path, m: Mutant, dry: bool = False) -> None:
    p = tree / m.path
    text = p.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutant {m.id}: snippet occurs {n} times in {m.path} (expected 1): {m.old!r}")
    if not dry:
        p.write_text(text.replace(m.old, m.new))


def run_suite(tree: Path, timeout: int, first: tuple[str, ...] = (), targeted: bool = False
              ) -> tuple[bool, str, float]:
    """-> (killed, first failing test or reason, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu",
           *dict.fromkeys([*first] if targeted and first else [*first, *TEST_ORDER])]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, f"timeout after {timeout} s", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    if r.returncode == 0:
        return False, "", dt
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    return True, failed[0] if failed else f"exit {r.returncode}: {r.stdout.strip().splitlines()[-1:]}", dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--baseline", action="store_true", help="first run the unmutated suite; stop if it fails")
    ap.add_argument("--targeted", action="store_true",
                    help="run only each mutant's likely killers (quick; surviving them is not surviving the suite)")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="janusflow-mutants-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        copy_tree(base)
        for m in chosen:  # every snippet must exist once before anything runs
            apply(base, m, dry=True)
        if args.baseline:
            failed, by, secs = run_suite(base, args.timeout)
            print(f"baseline: {'FAILED ' + by if failed else 'passed'} ({secs:.0f} s)", flush=True)
            if failed:
                return 1
        for m in chosen:
            tree = Path(tmp) / m.id
            shutil.copytree(base, tree, symlinks=True)
            apply(tree, m)
            killed, by, secs = run_suite(tree, args.timeout, m.first, args.targeted)
            shutil.rmtree(tree)
            results.append({"id": m.id, "file": m.path, "what": m.what, "killed": killed, "by": by,
                            "seconds": round(secs, 1), "targeted": bool(args.targeted and m.first)})
            print(f"{'KILLED ' if killed else 'SURVIVED'} {m.id:18s} {secs:6.0f}s  {by}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    survivors = [r["id"] for r in results if not r["killed"]]
    print(f"{len(results) - len(survivors)}/{len(results)} killed; survivors: {', '.join(survivors) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
