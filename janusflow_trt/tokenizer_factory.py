"""A small byte-level BPE tokenizer with the DeepSeek special tokens, for random test checkpoints.

Written as tokenizer.json + tokenizer_config.json the way the published checkpoint ships them
(tokenizer_class LlamaTokenizerFast, BOS added by add_bos_token, no post-processor of its own).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_TAG = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
BOG = "<｜begin▁of▁generation｜>"
SPECIALS = [BOS, EOS, PAD, IMAGE_TAG, BOI, EOI, BOG]

CORPUS = """You are a helpful language and vision assistant. You are able to understand the visual content
that the user provides, and assist the user with a variety of tasks using natural language.
User: Describe this image. Assistant: The image shows a red fox sitting in autumn leaves.
A photo of a cat on a rainbow. What is in the picture? Explain this meme. Convert the formula
into latex code. Master shifu racoon wearing drip attire as a street gangster. A cute and adorable
baby fox with big brown eyes, highly detailed, photorealistic, cinematic, natural colors.
The quick brown fox jumps over the lazy dog. 0123456789 , . ! ? ; : ' " ( ) [ ] { } - _ + = * / \\
"""


def build_tokenizer(out_dir: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": None,
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast", "unk_token": None, "use_default_system_prompt": False,
    }, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "additional_special_tokens": [IMAGE_TAG, BOI, EOI, BOG],
    }, indent=2))
    return tok
