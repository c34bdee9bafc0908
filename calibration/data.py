"""The inputs that calibration and the quality report feed through the FP32 runtime: prompts for
text-to-image, (photograph, question) pairs for chat. Built-in sets, or the user's own files.

The built-in photographs are scikit-image's bundled real photos (no download). Calibration and
held-out sets never share a prompt or a photograph: the quality report must measure on inputs the
FP32 islands were not chosen from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from janusflow_trt.errors import InputError
from janusflow_trt.images import load_image

from .record import spread

# 64 prompts across subjects, styles, lighting, composition and length
CALIB_PROMPTS = (
    "a red fox in autumn leaves", "a lighthouse on a rocky cliff at dusk", "a bowl of ramen with a soft egg",
    "portrait of an old fisherman, dramatic lighting", "a snowy mountain village at night",
    "an astronaut riding a horse on mars", "a watercolor painting of a koi pond",
    "a vintage red bicycle against a brick wall",
    "macro photo of a dew drop on a leaf", "a futuristic city skyline with flying cars",
    "a cat sleeping on a windowsill",
    "a plate of sushi on a wooden table", "an oil painting of sunflowers in a vase",
    "a desert with sand dunes under stars",
    "a cozy library with leather armchairs", "a steam locomotive crossing a stone bridge",
    "a hummingbird drinking nectar",
    "pencil sketch of a human hand", "a neon sign reading open in the rain", "a tropical beach with palm trees",
    "a medieval castle surrounded by fog", "a close-up of a tiger's eye", "a child flying a kite in a green field",
    "a bowl of fresh strawberries", "a low-poly 3d render of a fox", "a jazz band playing in a smoky bar",
    "an aerial view of a winding river", "a glass of red wine on a marble counter", "a robot reading a newspaper",
    "a field of lavender in provence", "an anime girl with blue hair", "a black and white photo of a busy street",
    "a hot air balloon over a canyon", "a wooden cabin by a frozen lake", "a bouquet of pink peonies",
    "a pixel art castle", "a golden retriever puppy in the snow", "the milky way over a mountain lake",
    "a bustling night market in taipei", "a stained glass window of a dragon", "an espresso with latte art",
    "a sailboat on a calm sea at sunrise", "a minimalist living room, scandinavian design", "a chameleon on a branch",
    "a thunderstorm over wheat fields", "an abstract painting with bold geometric shapes", "a pile of autumn pumpkins",
    "a samurai standing in cherry blossoms", "a submarine in deep blue water", "a loaf of sourdough bread",
    "a mossy forest path with sunbeams", "a polar bear on an ice floe", "a retro diner with chrome stools",
    "a colorful coral reef with fish", "a chess board mid-game, shallow depth of field", "an owl perched at night",
    "a street in venice with gondolas", "a bowl of tomato soup with basil", "a comic book panel of a superhero",
    "a volcano erupting at night", "a zen garden with raked sand", "a vintage typewriter on a desk",
    "a herd of elephants at sunset", "a snowy owl in flight",
)
HELDOUT_PROMPTS = (
    "a green parrot on a wooden fence", "a foggy harbor with fishing boats", "a slice of chocolate cake",
    "a knight in shining armor, oil painting", "a waterfall in a tropical jungle", "a paper origami crane",
    "a city bus in the rain at night", "a field of red poppies under a blue sky",
)
CALIB_QUESTIONS = ("What is in this image?", "Describe the image in detail.", "What colors dominate the picture?",
                   "Is there a person in this image?", "Where could this photo have been taken?")
HELDOUT_QUESTIONS = ("What do you see?", "Describe this picture briefly.", "What is the main object here?",
                     "What is the mood of this image?")
# scikit-image's bundled photographs (skimage.data), split once: calibration | held-out
CALIB_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "coins", "hubble_deep_field",
                "page", "grass", "gravel")
HELDOUT_PHOTOS = ("immunohistochemistry", "retina", "clock", "brick", "cell", "text", "microaneurysms", "colorwheel")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class InputSet:
    """prompts: text-to-image; pairs: (name, image, question) for chat; where: each prompt's origin for
    error messages ("--calib-prompts FILE line N"; empty for built-in prompts; not part of sha256)."""

    prompts: tuple[str, ...]
    pairs: tuple[tuple[str, Image.Image, str], ...]
    where: tuple[str, ...] = ()

    def origin(self, i: int) -> str:
        return self.where[i] if self.where else f"calibration prompt {i + 1}"

    def sha256(self) -> str:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(b"P" + p.encode() + b"\0")
        for name, img, q in self.pairs:
            h.update(b"I" + name.encode() + b"\0" + q.encode() + b"\0")
            h.update(np.asarray(img.convert("RGB")).tobytes())
        return h.hexdigest()


def skimage_photo(name: str) -> Image.Image:
    a = getattr(skimage.data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]).astype(np.uint8))


def _pairs(photos: tuple[str, ...], questions: tuple[str, ...]):
    return tuple((n, skimage_photo(n), questions[i % len(questions)]) for i, n in enumerate(photos))


def builtin_calibration() -> InputSet:
    return InputSet(CALIB_PROMPTS, _pairs(CALIB_PHOTOS, CALIB_QUESTIONS))


def builtin_heldout() -> InputSet:
    return InputSet(HELDOUT_PROMPTS, _pairs(HELDOUT_PHOTOS, HELDOUT_QUESTIONS))


def read_prompts(path: str | Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """One prompt per non-blank line of a UTF-8 file. -> (prompts, where: "--calib-prompts FILE line N")."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"--calib-prompts {path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"--calib-prompts {path}: is a directory, expected a text file") from None
    except OSError as e:
        raise InputError(f"--calib-prompts {path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"--calib-prompts {path} line {line}: not UTF-8 (byte {e.start})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise InputError(f"--calib-prompts {path}: no prompts (one per line)")
    return tuple(p for _, p in lines), tuple(f"--calib-prompts {path} line {n}" for n, _ in lines)


def read_images(path: str | Path) -> tuple[tuple[str, Image.Image], ...]:
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"--calib-images {path}: not a directory")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"--calib-images {path}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return tuple((f.name, load_image(f).convert("RGB")) for f in files)


def calibration_set(prompts_file: str | Path | None = None, images_dir: str | Path | None = None) -> InputSet:
    """The built-in set, with the user's prompts and/or photographs in place of the built-in ones."""
    base = builtin_calibration()
    prompts, where = read_prompts(prompts_file) if prompts_file is not None else (base.prompts, ())
    if images_dir is None:
        return InputSet(prompts, base.pairs, where)
    imgs = read_images(images_dir)
    pairs = tuple((n, img, CALIB_QUESTIONS[i % len(CALIB_QUESTIONS)]) for i, (n, img) in enumerate(imgs))
    return InputSet(prompts, pairs, where)


def split_heldout(inputs: InputSet, prompts: int, photos: int, questions: int) -> tuple[InputSet, InputSet]:
    """(calibration part, held-out part) of one input set: `prompts` of its prompts and `photos` of its
    photographs (evenly spread, first and last included) are taken out, so the recording and every range
    measured from it never see them; each held-out photograph is asked `questions` of the set's
    questions (its own first, then the next ones in order). Refused when a part would be empty."""
    if prompts >= len(inputs.prompts) or photos >= len(inputs.pairs):
        raise InputError(f"the quality gate holds out {prompts} prompt(s) and {photos} photograph(s) of the "
                         f"calibration set ({len(inputs.prompts)} prompts, {len(inputs.pairs)} photographs): "
                         "give more calibration inputs")
    hp, hi = set(spread(len(inputs.prompts), prompts)), set(spread(len(inputs.pairs), photos))
    qs = list(dict.fromkeys(q for _, _, q in inputs.pairs))
    held_pairs = tuple((name, img, qs[(qs.index(q) + k) % len(qs)])
                       for i, (name, img, q) in enumerate(inputs.pairs) if i in hi for k in range(questions))
    keep = [i for i in range(len(inputs.prompts)) if i not in hp]
    pairs = tuple(p for i, p in enumerate(inputs.pairs) if i not in hi)
    calib = InputSet(tuple(inputs.prompts[i] for i in keep), pairs,
                     tuple(inputs.where[i] for i in keep) if inputs.where else ())
    held = InputSet(tuple(inputs.prompts[i] for i in sorted(hp)), held_pairs)
    return calib, held
