"""Every bad input of issue #7, one row each: exit 2, one line on stderr, no traceback, nothing changed."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from contract import assert_refused
from PIL import Image
from safetensors.torch import load_file, save_file


class Ctx:
    def __init__(self, tiny: Path, tmp: Path, image: Path, onnx: Path | None = None):
        self.tiny, self.tmp, self.image, self._onnx = tiny, tmp, image, onnx

    def model(self, edit=None) -> Path:
        """A copy of the tiny checkpoint; edit(dir) changes it."""
        d = self.tmp / "model"
        if not d.exists():
            shutil.copytree(self.tiny, d)
        if edit:
            edit(d)
        return d

    def art(self, edit=None) -> Path:
        d = self.tmp / "art"
        if not d.exists():
            shutil.copytree(self._onnx, d)
        if edit:
            m = json.loads((d / "manifest.json").read_text())
            edit(m, d)
            (d / "manifest.json").write_text(json.dumps(m))
        return d

    def file(self, name: str, write) -> Path:
        p = self.tmp / name
        write(p)
        return p

    def chat(self, *extra, model=None):
        return ["chat", "--model", model or self.tiny, "--image", self.image, "--question", "q", *extra]

    def gen(self, *extra, model=None, out="o.png"):
        return ["generate", "--model", model or self.tiny, "--prompt", "a cat", "--steps", "2",
                "--out", self.tmp / out, *extra]


def json_edit(file: str, path: str, value):
    """edit(dir) setting config key path 'a.b.c' in file (value DELETE removes it)."""
    def edit(d: Path):
        raw = json.loads((d / file).read_text())
        node, *keys = raw, *path.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        (d / file).write_text(json.dumps(raw))
    return edit


def weights_edit(fn):
    def edit(d: Path):
        state = load_file(str(d / "model.safetensors"))
        save_file({k: fn(k, v) for k, v in state.items()}, str(d / "model.safetensors"))
    return edit


def png_header(w: int, h: int):
    """A PNG that declares w x h (only the header is ever read before the size check)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def write(p: Path):
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return write


def npy(arr):
    return lambda p: np.save(p, arr, allow_pickle=True)


LAT = (1, 4, 48, 48)
U, E = "vision_und_enc_config.params", "vision_gen_enc_config.params"

CASES = {
    # config.json: types, ranges, divisibility, each problem naming its key
    "cfg-image_size-str": lambda c: (c.chat(model=c.model(json_edit("config.json", f"{U}.image_size", "abc"))),
                                     f"{U}.image_size"),
    "cfg-image_size-null": lambda c: (c.chat(model=c.model(json_edit("config.json", f"{U}.image_size", None))),
                                      f"{U}.image_size"),
    "cfg-block_out_channels-int": lambda c: (
        c.chat(model=c.model(json_edit("config.json", f"{E}.block_out_channels", 32))), "block_out_channels"),
    "cfg-stride-str": lambda c: (c.chat(model=c.model(json_edit("config.json", f"{E}.stride", "2"))), f"{E}.stride"),
    "cfg-hidden-str": lambda c: (
        c.chat(model=c.model(json_edit("config.json", "language_config.hidden_size", "64"))),
        "language_config.hidden_size"),
    "cfg-heads-indivisible": lambda c: (
        c.chat(model=c.model(json_edit("config.json", "language_config.num_attention_heads", 5))),
        "not divisible by num_attention_heads"),
    # processor files vs config.json
    "pre-image_size-str": lambda c: (
        c.chat(model=c.model(json_edit("preprocessor_config.json", "image_size", "big"))), "image_size"),
    "pre-image_size-224": lambda c: (
        c.chat(model=c.model(json_edit("preprocessor_config.json", "image_size", 224))), "differs"),
    "tok-bos-int": lambda c: (c.chat(model=c.model(json_edit("tokenizer_config.json", "bos_token", 5))), "bos_token"),
    "proc-num_image_tokens": lambda c: (
        c.chat(model=c.model(json_edit("processor_config.json", "num_image_tokens", 100))), "num_image_tokens"),
    # images
    "image-bomb-20000": lambda c: (["chat", "--model", c.tiny, "--image", c.file("big.png", png_header(20000, 20000)),
                                    "--question", "q"], "megapixels"),
    "image-over-limit": lambda c: (["chat", "--model", c.tiny, "--image", c.file("big.png", png_header(9000, 9000)),
                                    "--question", "q"], "megapixels"),
    # numbers
    "temperature-tiny": lambda c: (c.chat("--temperature", "1e-40"), "--temperature"),
    "chat-threads-neg": lambda c: (c.chat("--threads", "-1"), "--threads"),
    "chat-threads-huge": lambda c: (c.chat("--threads", "100000"), "--threads"),
    "ort-threads-neg": lambda c: (c.chat("--threads", "-1", "--backend", "ort", "--artifacts", c.tmp), "--threads"),
    "gen-threads-zero": lambda c: (c.gen("--threads", "0"), "--threads"),
    "gen-num-images-over-specs": lambda c: (c.gen("--num-images", "9"), "batch limit"),
    # outputs: checked before the run
    "out-is-dir": lambda c: (c.gen(out="d") if (c.tmp / "d").mkdir() is None else None, "is a directory"),
    "out-exists": lambda c: (c.gen(out="o.png") if (c.tmp / "o.png").write_bytes(b"mine") else None, "--force"),
    "out-unknown-suffix": lambda c: (c.gen(out="o.foo"), "unknown suffix"),
    "out-second-image-blocked": lambda c: (
        c.gen("--num-images", "2", out="o.png") if (c.tmp / "o_1.png").mkdir() is None else None, "is a directory"),
    "latents-missing-dir": lambda c: (c.gen("--save-latents", c.tmp / "no" / "z.npy"), "does not exist"),
    "latents-is-dir": lambda c: (c.gen("--save-latents", c.tmp) , "is a directory"),
    "latents-bad-suffix": lambda c: (c.gen("--save-latents", c.tmp / "z.txt"), "unknown suffix"),
    # --init-latents: floating .npy only, never numpy's pickle hint
    "init-str": lambda c: (c.gen("--init-latents", c.file("s.npy", npy(np.full(LAT, "a")))), "dtype"),
    "init-npz": lambda c: (c.gen("--init-latents", c.file("z.npz", lambda p: np.savez(p, a=np.zeros(LAT)))), ".npz"),
    "init-png-as-npy": lambda c: (c.gen("--init-latents", c.file("x.npy", lambda p: Image.new("RGB", (4, 4)).save(
        p, format="PNG"))), "not a .npy"),
    "init-object": lambda c: (c.gen("--init-latents", c.file("o.npy", npy(np.array([None, 1], dtype=object)))),
                              "dtype"),
    "init-int32": lambda c: (c.gen("--init-latents", c.file("i.npy", npy(np.zeros(LAT, np.int32)))), "int32"),
    "init-bool": lambda c: (c.gen("--init-latents", c.file("b.npy", npy(np.zeros(LAT, bool)))), "bool"),
    "init-complex": lambda c: (c.gen("--init-latents", c.file("c.npy", npy(np.zeros(LAT, np.complex64)))), "complex"),
    # silent garbage before: now refused, naming where
    "init-huge": lambda c: (c.gen("--init-latents", c.file("h.npy", npy(np.full(LAT, 1e38, np.float32)))),
                            "non-finite (NaN or Inf) at Euler step 1"),
    "weights-nan-generate": lambda c: (c.gen(model=c.model(weights_edit(lambda k, v: torch.full_like(v, np.nan)))),
                                       "non-finite"),
    "weights-nan-chat": lambda c: (c.chat(model=c.model(weights_edit(lambda k, v: torch.full_like(v, np.nan)))),
                                   "non-finite logits"),
    "weights-int8": lambda c: (c.chat(model=c.model(weights_edit(
        lambda k, v: v.to(torch.int8) if "embed_tokens" in k else v))), "int8"),
    # VAE: no pickle, no library noise
    "vae-pickle-only": lambda c: (c.gen("--vae", c.model(lambda d: (
        d / "vae" / "diffusion_pytorch_model.safetensors").rename(d / "vae" / "diffusion_pytorch_model.bin")) / "vae"),
        "pickle is never loaded"),
    "vae-is-model-dir": lambda c: (c.gen("--vae", c.tiny), "not a diffusers AutoencoderKL"),
    # export
    "export-opset-14": lambda c: (["export", "--model", c.tiny, "--out", c.tmp / "o", "--opset", "14"], "opset"),
    # bench arguments, all before any work
    "bench-repeat-0": lambda c: (["bench", "--model", c.tiny, "--repeat", "0"], "--repeat"),
    "bench-steps-0": lambda c: (["bench", "--model", c.tiny, "--steps", "0"], "--steps"),
    "bench-steps-neg": lambda c: (["bench", "--model", c.tiny, "--steps", "-3"], "--steps"),
    "bench-threads-neg": lambda c: (["bench", "--model", c.tiny, "--threads", "-1"], "--threads"),
    "bench-out-file": lambda c: (["bench", "--model", c.tiny, "--out", c.file("f", lambda p: p.write_text("x"))],
                                 "not a directory"),
    "bench-out-has-results": lambda c: (["bench", "--model", c.tiny, "--out", c.tmp] if (
        c.tmp / "bench.json").write_text("{}") else None, "--force"),
    "bench-contexts-beyond-model": lambda c: (["bench", "--model", c.tiny, "--contexts", "6000"], "does not fit"),
}

ORT_CASES = {
    # hand-edited or foreign manifests
    "manifest-entry-no-file": lambda c: c.art(lambda m, d: m["graphs"]["embed"].pop("file")),
    "manifest-entry-string": lambda c: c.art(lambda m, d: m["graphs"].__setitem__("embed", "embed.onnx")),
    "manifest-file-outside": lambda c: c.art(lambda m, d: m["graphs"]["embed"].__setitem__("file", "../x.onnx")),
    "manifest-newer-version": lambda c: c.art(lambda m, d: m.__setitem__("janusflow_trt_version", "0.2.0")),
    "manifest-bad-version": lambda c: c.art(lambda m, d: m.__setitem__("janusflow_trt_version", 2)),
    "manifest-unknown-graph": lambda c: c.art(lambda m, d: m["graphs"].__setitem__("vision", m["graphs"]["embed"])),
    "manifest-graph-truncated": lambda c: c.art(lambda m, d: (d / "llm.onnx").write_bytes(
        (d / "llm.onnx").read_bytes()[:1000])),
}
NEEDLES = {"manifest-entry-no-file": "graphs.embed.file", "manifest-entry-string": "graphs.embed is not an object",
           "manifest-file-outside": "file name inside", "manifest-newer-version": "0.2.0",
           "manifest-bad-version": "x.y.z", "manifest-unknown-graph": "unknown graph 'vision'",
           "manifest-graph-truncated": "truncated"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_dir, tmp_path, test_image, capfd):
    argv, needle = CASES[case](Ctx(tiny_dir, tmp_path, test_image))
    assert_refused(argv, capfd, [tmp_path, tiny_dir], needle)


@pytest.mark.parametrize("case", list(ORT_CASES))
def test_bad_manifest(case, tiny_dir, tiny_onnx, tmp_path, test_image, capfd):
    c = Ctx(tiny_dir, tmp_path, test_image, tiny_onnx)
    art = ORT_CASES[case](c)
    assert_refused(c.chat("--backend", "ort", "--artifacts", art), capfd, [tmp_path, tiny_dir], NEEDLES[case])


def test_artifacts_from_other_weights_same_config(tiny_dir, tiny_onnx, tmp_path, test_image, capfd):
    from janusflow_trt.tiny import make_tiny

    other = make_tiny(tmp_path / "seed1", seed=1)
    assert (other / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    c = Ctx(other, tmp_path, test_image)
    assert_refused(c.chat("--backend", "ort", "--artifacts", tiny_onnx), capfd, [tmp_path, tiny_onnx],
                   "other weights")


def test_verify_graph_truncated_and_rehashed(tiny_dir, tiny_onnx, tmp_path, capfd):
    from janusflow_trt.export.manifest import file_record

    def truncate(m, d):
        (d / "embed.onnx").write_bytes((d / "embed.onnx").read_bytes()[:5000])
        m["graphs"]["embed"].update(file_record(d, "embed.onnx"))

    art = Ctx(tiny_dir, tmp_path, Path(), tiny_onnx).art(truncate)
    assert_refused(["verify", "--model", tiny_dir, "--artifacts", art], capfd, [tmp_path, tiny_dir], "cannot load")


def test_verify_catches_a_same_size_edit_the_quick_check_misses(tiny_dir, tiny_onnx, tmp_path, capfd):
    """The start-up check reads size + first/last MiB; verify hashes every byte."""
    from janusflow_trt.fingerprint import EDGE

    art = Ctx(tiny_dir, tmp_path, Path(), tiny_onnx).art()
    m = json.loads((art / "manifest.json").read_text())
    big = max(m["graphs"], key=lambda g: m["graphs"][g]["size"])
    f = art / m["graphs"][big]["file"]
    data = bytearray(f.read_bytes())
    if len(data) <= 2 * EDGE:
        data.extend(b"\0" * (2 * EDGE + 10 - len(data)))  # room for a middle the quick digest skips
        m["graphs"][big].update(size=len(data))
    mid = len(data) // 2
    data[mid] ^= 0xFF
    f.write_bytes(bytes(data))
    from janusflow_trt.fingerprint import quick_digest

    m["graphs"][big]["quick"] = quick_digest(f)  # as if only the middle had changed
    (art / "manifest.json").write_text(json.dumps(m))
    assert_refused(["verify", "--model", tiny_dir, "--artifacts", art], capfd, [tmp_path, tiny_dir], "sha256 differs")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_out_in_read_only_dir(tiny_dir, tmp_path, capfd):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        c = Ctx(tiny_dir, tmp_path, Path())
        assert_refused(c.gen(out="ro/o.png"), capfd, [tmp_path], "not writable")
        assert_refused(c.gen("--save-latents", ro / "z.npy"), capfd, [tmp_path], "not writable")
    finally:
        ro.chmod(0o755)
