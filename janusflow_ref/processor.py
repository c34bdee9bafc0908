"""VLChatProcessor equivalent: tokenizer, the `deepseek` SFT template, VLMImageProcessor preprocessing.

Official behaviour reproduced here (janus/janusflow/models/processing_vlm.py, image_processing_vlm.py,
janus/utils/conversation.py, demo/app_janusflow.py):
- prompt = system + "\\n\\n" (when non-empty) + "User: <content>\\n\\n" + "Assistant:" ; messages are
  stripped, the whole prompt is stripped; chat uses the processor's system prompt, generation uses "".
- ids = BOS + tokenizer(prompt) (LlamaTokenizerFast with add_bos_token).
- every <image_placeholder> id becomes <begin_of_image>, 576 x <image_placeholder>, <end_of_image>;
  the image embeddings (begin-of-understanding + 576 patches) go at <begin_of_image> and the 576.
- image: bicubic resize of the long side to image_size (short side int() truncated, >= min_size),
  pad to square with the background colour int(mean*255), rescale (float64 then float32), normalise.
- generation prompt = template(system "") + "<begin_of_image>"; its last token is later replaced by t_emb.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase
from transformers.image_transforms import normalize, rescale

from janusflow_trt.errors import CheckpointError, InputError
from janusflow_trt.images import load_image  # noqa: F401  (callers import it from here)

from .config import load_config

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
SEP, SEP2 = "\n\n", "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"


def sft_prompt(messages: list[tuple[str, str]], system_prompt: str) -> str:
    """The official `deepseek` conversation template (SeparatorStyle.DeepSeek), then .strip()."""
    out = system_prompt + SEP if system_prompt else ""
    for i, (role, message) in enumerate(messages):
        message = message.strip()
        out += f"{role}: {message}{(SEP, SEP2)[i % 2]}" if message else f"{role}:"
    return out.strip()


@dataclass(frozen=True)
class ImageConfig:
    image_size: int = 384
    min_size: int = 14
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True

    @property
    def background_color(self) -> tuple[int, ...]:
        # VLMImageProcessor recomputes it from image_mean, whatever preprocessor_config.json says.
        return tuple(int(x * 255) for x in self.image_mean)


def expand_to_square(img: Image.Image, color: tuple[int, ...]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def preprocess_image(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """PIL image -> float32 [3, S, S]."""
    img = img.convert("RGB")
    w, h = img.size
    m = max(w, h)
    new_h = max(int(h / m * cfg.image_size), cfg.min_size)
    new_w = max(int(w / m * cfg.image_size), cfg.min_size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)  # what torchvision's resize does for PIL input
    x = np.transpose(np.asarray(expand_to_square(img, cfg.background_color)), (2, 0, 1))
    x = rescale(x, cfg.rescale_factor, input_data_format="channels_first")
    if cfg.do_normalize:
        x = normalize(x, cfg.image_mean, cfg.image_std, input_data_format="channels_first")
    return x


@dataclass
class ChatInputs:
    input_ids: torch.Tensor  # [1, T] long (placeholders stay image ids; they are overwritten by embeddings)
    image_positions: torch.Tensor  # [N+1] long: where the begin + N patch embeddings go
    pixel_values: torch.Tensor  # [1, 3, S, S] float32
    prompt: str


class Processor:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"no tokenizer.json in {d}")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{tok_file}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        tcfg = _read_json(d / "tokenizer_config.json", required=False)
        pcfg = _read_json(d / "processor_config.json", required=False)
        icfg = _read_json(d / "preprocessor_config.json", required=False)
        _check_types(d, tcfg, pcfg, icfg)
        self.add_bos = tcfg.get("add_bos_token", True)
        self.clean_up_spaces = tcfg.get("clean_up_tokenization_spaces", True)
        self.image_tag = pcfg.get("image_tag", "<image_placeholder>")
        self.image_start_tag = "<begin_of_image>"
        self.image_end_tag = "<end_of_image>"
        self.num_image_tokens = pcfg.get("num_image_tokens", 576)
        self.add_special_token = pcfg.get("add_special_token", False)
        if pcfg.get("sft_format", "deepseek") != "deepseek":
            raise CheckpointError(f"processor_config.json: sft_format {pcfg.get('sft_format')!r} is not 'deepseek'")
        fields = ImageConfig.__dataclass_fields__
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in icfg.items() if k in fields}
        if "image_size" not in icfg:
            raise CheckpointError(f"preprocessor_config.json in {d} is missing image_size")
        self.image_cfg = ImageConfig(**kw)
        _check_against_config(d, self)
        bos, eos = _token_name(tcfg, "bos_token"), _token_name(tcfg, "eos_token")
        self.bos_id = self._id(bos or "<｜begin▁of▁sentence｜>")
        self.eos_id = self._id(eos or "<｜end▁of▁sentence｜>")
        self.image_id = self._id(self.image_tag)
        self.image_start_id = self._id(self.image_start_tag)
        self.image_end_id = self._id(self.image_end_tag)
        pad = self.tokenizer.token_to_id(PAD_TOKEN)
        self.pad_id = pad if pad is not None else self.eos_id

    @property
    def special_tokens(self) -> list[str]:
        """The tokenizer's added tokens: user text holding one would be read as markup (an image slot, a BOS)."""
        return [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise CheckpointError(f"tokenizer has no token {token!r}")
        return i

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def chat_prompt(self, question: str, system_prompt: str = SYSTEM_PROMPT) -> str:
        return sft_prompt([("User", f"{self.image_tag}\n{question}"), ("Assistant", "")], system_prompt)

    def generation_prompt(self, prompt: str) -> str:
        return sft_prompt([("User", prompt), ("Assistant", "")], "") + self.image_start_tag

    def generation_ids(self, prompt: str) -> list[int]:
        return self.encode(self.generation_prompt(prompt))

    # -- chat ------------------------------------------------------------------------------------
    def expand_image_tokens(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        block = [self.image_start_id, *[self.image_id] * self.num_image_tokens, self.image_end_id]
        for i in ids:
            if i == self.image_id:
                if self.add_special_token:
                    out.append(i)
                out.extend(block)
            else:
                out.append(i)
        return out

    def chat_inputs(self, image: Image.Image, question: str, system_prompt: str = SYSTEM_PROMPT) -> ChatInputs:
        prompt = self.chat_prompt(question, system_prompt)
        ids = self.encode(prompt)
        if ids.count(self.image_id) != 1:
            raise InputError(f"the question must not contain {self.image_tag!r}: one image per chat")
        ids = self.expand_image_tokens(ids)
        t = torch.tensor(ids, dtype=torch.long)
        positions = torch.nonzero((t == self.image_id) | (t == self.image_start_id)).flatten()
        pixels = torch.from_numpy(preprocess_image(image, self.image_cfg))[None]
        return ChatInputs(input_ids=t[None], image_positions=positions, pixel_values=pixels, prompt=prompt)


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces rule (an instance method there since v5)."""
    return PreTrainedTokenizerBase.clean_up_tokenization(None, text)


_PROC_TYPES = {  # file -> key -> (check, what it must be)
    "tokenizer_config.json": {"add_bos_token": (lambda v: isinstance(v, bool), "true or false"),
                              "clean_up_tokenization_spaces": (lambda v: isinstance(v, bool), "true or false"),
                              "bos_token": (lambda v: v is None or _token_name({"t": v}, "t") is not None,
                                            "a token string"),
                              "eos_token": (lambda v: v is None or _token_name({"t": v}, "t") is not None,
                                            "a token string")},
    "processor_config.json": {"image_tag": (lambda v: isinstance(v, str) and v != "", "a token string"),
                              "num_image_tokens": (lambda v: type(v) is int and v > 0, "a positive integer"),
                              "add_special_token": (lambda v: isinstance(v, bool), "true or false")},
    "preprocessor_config.json": {
        "image_size": (lambda v: type(v) is int and 1 <= v <= 4096, "an integer in [1, 4096]"),
        "min_size": (lambda v: type(v) is int and 1 <= v <= 4096, "an integer in [1, 4096]"),
        "image_mean": (lambda v: _nums(v, 0.0, 1.0), "a list of 3 numbers in [0, 1]"),
        "image_std": (lambda v: _nums(v, 1e-6, 10.0), "a list of 3 numbers in (0, 10]"),
        "rescale_factor": (lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
        "do_normalize": (lambda v: isinstance(v, bool), "true or false")},
}


def _num(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _nums(v, lo: float, hi: float) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_num(x) and lo <= x <= hi for x in v)


def _check_types(d: Path, *cfgs: dict) -> None:
    problems = [f"{name}: {k} must be {what}, got {c[k]!r}"[:200]
                for (name, checks), c in zip(_PROC_TYPES.items(), cfgs, strict=True)
                for k, (ok, what) in checks.items() if k in c and not ok(c[k])]
    if problems:
        raise CheckpointError(f"{d}: " + "; ".join(problems))


def _check_against_config(d: Path, proc: Processor) -> None:
    """The processor files must describe the model config.json describes."""
    cfg = load_config(d)
    problems = []
    if proc.image_cfg.image_size != cfg.siglip.image_size:
        problems.append(f"preprocessor_config.json image_size {proc.image_cfg.image_size} differs from config.json's "
                        f"vision image_size {cfg.siglip.image_size}")
    if proc.num_image_tokens != cfg.siglip.num_patches:
        problems.append(f"processor_config.json num_image_tokens {proc.num_image_tokens} differs from the "
                        f"{cfg.siglip.num_patches} patches of the vision config")
    if problems:
        raise CheckpointError(f"{d}: " + "; ".join(problems))


def _token_name(tcfg: dict, key: str) -> str | None:
    v = tcfg.get(key)
    if isinstance(v, dict):  # AddedToken serialised as {"content": ...}
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"missing {path}")
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
