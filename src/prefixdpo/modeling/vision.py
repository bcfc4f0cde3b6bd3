"""Which vision-language models train on image data with prefix sharing, decided from the config (and the
processor) before any weights or data load.

A family is supported when its language model is causal, its image features replace the image placeholder tokens
of the language model's input in order (so each document's features land at its own image tokens in the packed row),
its vision tower runs each image apart from the text, and its positions are the layout's (1-D) or its own
multi-axis rope index (``positions``). The families below were checked against ``trl.DPOTrainer`` (tests/test_vision.py).
"""

from __future__ import annotations

from .attention import UnsupportedModelError

# model_type -> how its positions are made ("1-D": the layout's; "multi-axis": the model's rope index per document).
VISION_FAMILIES = {
    "llava": "1-D",
    "idefics3": "1-D",
    "qwen2_vl": "multi-axis",
    "qwen2_5_vl": "multi-axis",
}
# Models whose image tokens attend to each other in both directions (a bidirectional block per image, or PaliGemma's
# whole prefix), which a causal prefix layout cannot express.
BIDIRECTIONAL_IMAGES = {
    "gemma3": "Gemma 3",
    "paligemma": "PaliGemma",
    "gemma4": "Gemma 4",
}


def check_vision_model(config) -> None:
    """Raise ``UnsupportedModelError`` (one line that says images) unless a model of ``config`` can train on image
    data with prefix sharing."""
    model_type = getattr(config, "model_type", "")
    if model_type in BIDIRECTIONAL_IMAGES:
        raise UnsupportedModelError(
            f"images with {BIDIRECTIONAL_IMAGES[model_type]} ({model_type}) are not supported: its image tokens attend "
            "to each other in both directions (bidirectional image attention), which prefix sharing's causal layout "
            "cannot express; train it with trl.DPOTrainer"
        )
    if model_type not in VISION_FAMILIES:
        raise UnsupportedModelError(
            f"images with a {model_type or type(config).__name__} model are not supported by prefix sharing (image "
            f"datasets train {', '.join(sorted(VISION_FAMILIES))}); train it with trl.DPOTrainer"
        )


def check_vision_processor(processing_class) -> None:
    """Raise ``UnsupportedModelError`` unless ``processing_class`` can process images (a processor with an image
    processor and an image token)."""
    from transformers import ProcessorMixin

    if not isinstance(processing_class, ProcessorMixin) or getattr(processing_class, "image_processor", None) is None:
        raise UnsupportedModelError(
            f"images need the model's processor (AutoProcessor, with an image processor), got "
            f"{type(processing_class).__name__}"
        )
    if getattr(processing_class, "image_token_id", None) is None and not getattr(processing_class, "image_token_ids",
                                                                                 None):
        raise UnsupportedModelError(
            f"images: the processor {type(processing_class).__name__} names no image token (image_token_id), so the "
            "image tokens of a packed row cannot be found"
        )
