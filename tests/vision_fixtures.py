"""Tiny vision-language models and their processors, built offline from configs, and image preference data made in
memory: the LLaVA, Qwen2.5-VL and Idefics3 families (each with its own image placeholder expansion, image inputs and,
for Qwen2.5-VL, multi-axis rotary positions)."""

from __future__ import annotations

import random

import numpy as np
import torch

WORDS = 60
FAMILIES = ("llava", "qwen2_5_vl", "idefics3", "qwen2_vl")
# What the chat template writes for one image, per family (the processor expands it into the image's tokens).
_IMAGE_TEXT = {
    "llava": "<image>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
}
_SPECIALS = {
    "llava": ["<image>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "qwen2_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"],
}


def _chat_template(family: str) -> str:
    image = _IMAGE_TEXT[family]
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {% else %}Assistant: {% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + " {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
        "{% if m['role'] != 'user' %}<eos> {% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
    )


def make_vision_tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    extra = _SPECIALS[family]
    words = [f"w{i}" for i in range(WORDS)] + ["User:", "Assistant:"]
    vocab = {t: i for i, t in enumerate(specials + extra + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                eos_token="<eos>")
    t.add_special_tokens({"additional_special_tokens": extra})
    return t


def make_processor(family: str):
    """A processor of ``family`` with the tokenizer above: small images (56 pixels a side, or the nearest size the
    family's image processor makes) and the families' own placeholder expansion."""
    tok = make_vision_tokenizer(family)
    template = _chat_template(family)
    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=template)
    if family in ("qwen2_5_vl", "qwen2_vl"):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        base = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor

        class TinyQwenProcessor(base):
            # Without torchvision there is no video processor to give it; images need none.
            def check_argument_for_proper_class(self, argument_name, argument):
                if argument_name != "video_processor" or argument is not None:
                    return super().check_argument_for_proper_class(argument_name, argument)

        ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=84 * 84, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
        return TinyQwenProcessor(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=template)
    if family == "idefics3":
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 28},
                                       max_image_size={"longest_edge": 28})
        return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=1, chat_template=template)
    raise ValueError(family)


def _text_config(vocab_size: int, **kw) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **kw)


def make_vision_model(family: str, processor, seed: int = 0, dtype=torch.float32):
    """A random-init model of ``family`` whose image token ids match ``processor``'s tokenizer (SDPA attention)."""
    tok = processor.tokenizer
    vocab = len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIALS[family]}
    torch.manual_seed(seed)
    if family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        cfg = LlavaConfig(
            text_config={"model_type": "llama", **_text_config(vocab)},
            vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 14,
                           "projection_dim": 32},
            image_token_id=ids["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
        )
        cls = LlavaForConditionalGeneration
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        cfg = Qwen2_5_VLConfig(
            text_config=_text_config(vocab, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [2, 1, 1]}),
            vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                           "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                           "window_size": 56, "fullatt_block_indexes": [1], "in_channels": 3},
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        cls = Qwen2_5_VLForConditionalGeneration
    elif family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        cfg = Qwen2VLConfig(
            text_config=_text_config(vocab, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [2, 1, 1]}),
            vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 4,
                           "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        cls = Qwen2VLForConditionalGeneration
    elif family == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        cfg = Idefics3Config(
            text_config={"model_type": "llama", **_text_config(vocab)},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
            image_token_id=ids["<image>"], scale_factor=2,
        )
        cls = Idefics3ForConditionalGeneration
    else:
        raise ValueError(family)
    model = cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    return model


def random_image(rng: random.Random, size: tuple[int, int] | None = None):
    from PIL import Image

    w, h = size or rng.choice([(56, 56), (28, 56), (56, 28), (84, 56)])
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))


def make_image_pairs(n: int, seed: int = 0, images=(1, 1), prompt=(1, 6), response=(1, 6), text_only_every: int = 0,
                     repeat_prompt_every: int = 0, same_tokens_other_image_every: int = 0):
    """Conversational image preference rows (``images``, ``prompt``, ``chosen``, ``rejected``) as TRL takes them.

    ``images``: (min, max) images per prompt; ``text_only_every``: every k-th row has no image;
    ``repeat_prompt_every``: every k-th row repeats the previous row's prompt and images with new responses (pairs that
    may share a document); ``same_tokens_other_image_every``: every k-th row repeats the previous prompt text with a
    different image of the same size (equal prompt token ids, different pixels: must not share)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen = _words(rng, rng.randint(*response))
        rejected = _words(rng, rng.randint(*response))
        while rejected == chosen:
            rejected = _words(rng, rng.randint(*response))
        if rows and repeat_prompt_every and i % repeat_prompt_every == 0:
            prev = rows[-1]
            rows.append({**prev, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
            continue
        if rows and same_tokens_other_image_every and i % same_tokens_other_image_every == 0 and rows[-1]["images"]:
            prev = rows[-1]
            imgs = [random_image(rng, im.size) for im in prev["images"]]
            rows.append({**prev, "images": imgs, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
            continue
        k = 0 if text_only_every and i % text_only_every == 0 else rng.randint(*images)
        rows.append({
            "images": [random_image(rng) for _ in range(k)],
            "prompt": [{"role": "user", "content": _words(rng, rng.randint(*prompt))}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
    return rows
