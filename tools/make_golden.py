"""Golden tensors from the OFFICIAL deepseek-ai/Janus code (not run by CI).

Runs in its own environment (tools/requirements-golden.txt), never imports this project, and imports
the official package from the path given on the command line:

    janusflow make-tiny ck --size golden --seed 0                     # our venv: the checkpoint
    /work/venvs/official/bin/python tools/make_golden.py --janus /path/to/Janus --model ck --out tests/golden

Chat follows demo/app_janusflow.py:multimodal_understanding (VLChatProcessor, prepare_inputs_embeds,
language_model.generate); generation follows demo/app_janusflow.py:generate line by line, in FP32 on the
CPU. Large tensors are stored as row subsets (ROWS) to keep the files small; tests/golden/README.md says
what each array is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

QUESTION = "What is in the picture?"
PROMPT = "A red fox in autumn leaves"
MAX_NEW = 20
CHAT_SEED = 42
# (name, temperature, top_p, seed): the demo's defaults, and a broad distribution where top-k 50 bites
SAMPLED = (("demo", 0.1, 0.95, 42), ("broad", 1.0, 0.95, 4))
NUM_IMAGES, CFG, STEPS, GEN_SEED, FIRST_STEPS = 2, 2.0, 30, 12345, 4
ROWS = slice(None, None, 9)  # every 9th of the 576 image rows (64 rows)


def golden_image() -> Image.Image:
    """160x96 RGB: a gradient plus seeded noise (non-square: exercises resize and pad)."""
    rng = np.random.RandomState(0)
    y, x = np.mgrid[0:96, 0:160]
    base = np.stack([x * 1.5, y * 2.5, (x + y) * 0.8], axis=-1)
    return Image.fromarray(np.clip(base + rng.rand(96, 160, 3) * 60, 0, 255).astype(np.uint8))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.inference_mode()
def chat_goldens(vl_gpt, proc, image: Image.Image) -> dict[str, np.ndarray]:
    tok = proc.tokenizer
    conversation = [{"role": "User", "content": f"<image_placeholder>\n{QUESTION}", "images": [image]},
                    {"role": "Assistant", "content": ""}]
    inputs = proc(conversations=conversation, images=[image], force_batchify=True)
    feats = vl_gpt.vision_und_enc_model(inputs.pixel_values[:, 0])  # [1, 576, 1024]
    embeds = vl_gpt.prepare_inputs_embeds(**inputs)  # [1, T, 2048]
    seq = inputs.images_seq_mask[0]
    text_rows = torch.nonzero(~seq)[:, 0]
    img_rows = torch.nonzero(seq)[:, 0]  # begin-of-understanding + 576 patches

    def run(temperature: float, top_p: float, seed: int):
        torch.manual_seed(seed)
        np.random.seed(seed)
        out = vl_gpt.language_model.generate(
            inputs_embeds=embeds, attention_mask=inputs.attention_mask, pad_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=MAX_NEW,
            do_sample=temperature != 0, use_cache=True, temperature=temperature, top_p=top_p,
            output_logits=True, return_dict_in_generate=True)
        return out.sequences[0], torch.cat(out.logits, 0)

    greedy, logits = run(0.0, 0.95, CHAT_SEED)
    g = {
        "chat_input_ids": inputs.input_ids[0].numpy(),
        "chat_attention_mask": inputs.attention_mask[0].numpy(),
        "chat_images_seq_mask": seq.numpy(),
        "pixel_values": inputs.pixel_values[0, 0].numpy(),
        "siglip_features_rows": feats[0, ROWS].numpy(),
        "image_embeds_rows": embeds[0, img_rows[1:][ROWS]].numpy(),
        "begin_of_und_embed": embeds[0, img_rows[0]].numpy(),
        "text_embeds": embeds[0, text_rows].numpy(),
        "greedy_tokens": greedy.numpy(),
        "greedy_logits": logits.numpy(),  # [steps, V] raw logits of each decoding step
    }
    for name, temperature, top_p, seed in SAMPLED:
        g[f"sampled_{name}_tokens"] = run(temperature, top_p, seed)[0].numpy()
    return g


@torch.inference_mode()
def generation_goldens(vl_gpt, proc, vae) -> dict[str, np.ndarray]:
    """demo/app_janusflow.py:generate_image + generate, n images instead of 5, FP32 on the CPU."""
    torch.manual_seed(GEN_SEED)
    np.random.seed(GEN_SEED)
    messages = [{"role": "User", "content": PROMPT}, {"role": "Assistant", "content": ""}]
    text = proc.apply_sft_template_for_multi_turn_prompts(conversations=messages, sft_format=proc.sft_format,
                                                          system_prompt="")
    text = text + proc.image_start_tag
    input_ids = torch.LongTensor(proc.tokenizer.encode(text))

    n = NUM_IMAGES
    tokens = torch.stack([input_ids] * (2 * n))
    tokens[n:, 1:] = proc.pad_id
    inputs_embeds = vl_gpt.language_model.get_input_embeddings()(tokens)[:, :-1, :]
    z = torch.randn((n, 4, 48, 48), dtype=torch.float32)
    z0 = z.clone()
    dt = torch.zeros_like(z) + 1.0 / STEPS
    attention_mask = torch.ones((2 * n, inputs_embeds.shape[1] + 577))
    attention_mask[n:, 1:inputs_embeds.shape[1]] = 0
    attention_mask = attention_mask.int()
    g: dict[str, np.ndarray] = {"gen_input_ids": input_ids.numpy(), "cfg_tokens": tokens.numpy(),
                                "cfg_attention_mask": attention_mask.numpy(), "z0": z0.numpy()}
    ts, zs = [], []
    for step in range(STEPS):
        z_input = torch.cat([z, z], dim=0)
        t = step / STEPS * 1000.0
        ts.append(t)
        t = torch.tensor([t] * z_input.shape[0]).to(dt)
        z_emb, t_emb, hs = vl_gpt.vision_gen_enc_model(z_input, t)
        z_emb = z_emb.view(z_emb.shape[0], z_emb.shape[1], -1).permute(0, 2, 1)
        z_emb = vl_gpt.vision_gen_enc_aligner(z_emb)
        llm_emb = torch.cat([inputs_embeds, t_emb.unsqueeze(1), z_emb], dim=1)
        # The demo passes an always-empty past_key_values tuple after step 0 (its KV-trimming loop runs
        # over an empty list), i.e. no cache: the prompt is recomputed every step. None says that in 4.49.
        outputs = vl_gpt.language_model.model(inputs_embeds=llm_emb, use_cache=True, attention_mask=attention_mask,
                                              past_key_values=None)
        hidden_states = outputs.last_hidden_state
        hidden_states = vl_gpt.vision_gen_dec_aligner(vl_gpt.vision_gen_dec_aligner_norm(hidden_states[:, -576:, :]))
        hidden_states = hidden_states.reshape(z_emb.shape[0], 24, 24, 768).permute(0, 3, 1, 2)
        v = vl_gpt.vision_gen_dec_model(hidden_states, hs, t_emb)
        if step == 0:
            g["step0_t_emb"] = t_emb.numpy()
            g["step0_llm_in_rows"] = llm_emb[:, -577:][:, ROWS].numpy()
            g["step0_velocity"] = v.numpy()  # [2n, 4, 48, 48]: cond rows, then uncond rows
        v_cond, v_uncond = torch.chunk(v, 2)
        v = CFG * v_cond - (CFG - 1.0) * v_uncond
        z = z + dt * v
        if step < FIRST_STEPS:
            zs.append(z.clone())
    g["t_schedule"] = np.array(ts, np.float64)
    g["latents_first_steps"] = torch.stack(zs).numpy()  # [FIRST_STEPS, n, 4, 48, 48]
    g["latents_final"] = z.numpy()
    decoded = vae.decode(z / vae.config.scaling_factor).sample
    # a 32x32 float crop, copied: the demo's .float().clip_() below clips `decoded` in place (FP32)
    g["decoded_center"] = decoded[:, :, 176:208, 176:208].numpy().copy()
    images = decoded.float().clip_(-1.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
    g["image_uint8"] = ((images + 1) / 2.0 * 255).astype(np.uint8)
    return g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--janus", required=True, type=Path, help="checkout of github.com/deepseek-ai/Janus")
    ap.add_argument("--model", required=True, type=Path, help="`janusflow make-tiny DIR --size golden` output")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--janus-commit", default="", help="official commit, if --janus is not a git checkout")
    args = ap.parse_args()
    sys.path.insert(0, str(args.janus.resolve()))
    torch.set_num_threads(2)
    from diffusers.models import AutoencoderKL
    from janus.janusflow.models import MultiModalityCausalLM, VLChatProcessor

    proc = VLChatProcessor.from_pretrained(str(args.model))
    vl_gpt = MultiModalityCausalLM.from_pretrained(str(args.model), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(str(args.model / "vae")).to(torch.float32).eval()

    args.out.mkdir(parents=True, exist_ok=True)
    image = golden_image()
    image.save(args.out / "input.png")
    image = Image.open(args.out / "input.png").convert("RGB")  # what the tests read
    chat = chat_goldens(vl_gpt, proc, image)
    gen = generation_goldens(vl_gpt, proc, vae)
    np.savez_compressed(args.out / "chat.npz", **chat)
    np.savez_compressed(args.out / "generation.npz", **gen)

    commit = args.janus_commit
    if not commit:
        commit = subprocess.run(["git", "-C", str(args.janus), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    import diffusers
    import timm
    import transformers

    meta = {
        "official_repo": "https://github.com/deepseek-ai/Janus", "official_commit": commit,
        "checkpoint": "janusflow make-tiny DIR --size golden --seed 0",
        "model_safetensors_sha256": sha256(args.model / "model.safetensors"),
        "vae_safetensors_sha256": sha256(args.model / "vae" / "diffusion_pytorch_model.safetensors"),
        "question": QUESTION, "max_new_tokens": MAX_NEW, "chat_seed": CHAT_SEED,
        "sampled": [dict(name=n, temperature=t, top_p=p, seed=s) for n, t, p, s in SAMPLED],
        "prompt": PROMPT, "num_images": NUM_IMAGES, "cfg_weight": CFG, "steps": STEPS, "gen_seed": GEN_SEED,
        "first_steps": FIRST_STEPS, "rows_stride": ROWS.step,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "timm": timm.__version__,
                     "diffusers": diffusers.__version__, "numpy": np.__version__},
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}: chat.npz, generation.npz, input.png, meta.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
