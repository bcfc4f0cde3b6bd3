"""Image preference data: the packing collator for vision-language models, and what the samplers and data-stats
measure of such data.

TRL does not tokenize a vision dataset (``images`` or ``image`` column); its ``DataCollatorForVisionPreference``
renders each pair (chat template, image placeholders), runs the processor on every pair's prompt and images twice
(once for the chosen sequence, once for the rejected) and the model's vision tower encodes every image twice. Here:

* the processor runs once per distinct prompt of the micro-batch (equal rendered prompt text *and* equal images),
  and the packed row carries each such prompt's image inputs once, in the order of its documents, so the vision tower
  encodes each image once and the model places its features at that document's image tokens (every supported model
  fills its image tokens in row order). With ``prefix_sharing=False`` every sequence is a document of its own and
  carries its own copy of the images, as in TRL;
* two prompts share a document only when their images are equal too: image placeholder tokens are equal for images
  of equal size (``packing.PREFIX_KEY`` holds a fingerprint of the prompt text and the images' pixels);
* TRL's padded per-pair view is the one its vision collator builds (prompt + response cut to ``max_length``, keeping
  the start), so the per-pair log-probs land where TRL's loss reads them.

The data side imports no torch.cuda.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from .collator import PACKED_KEY, packed_inputs
from .packing import PREFIX_KEY, pack_pairs, pair_placements

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("images", "image")
# Processor outputs that are not image inputs of the model: the text side, which the packed row replaces.
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def is_vision_dataset(dataset) -> bool:
    """Whether a dataset holds images (an ``images`` or ``image`` column), as TRL decides it; read from the column
    names where the dataset has them, else from its first row."""
    if dataset is None:
        return False
    if isinstance(dataset, dict):
        return any(is_vision_dataset(d) for d in dataset.values())
    columns = getattr(dataset, "column_names", None)
    if columns:
        return any(c in columns for c in IMAGE_COLUMNS)
    try:
        first = next(iter(dataset))
    except (StopIteration, TypeError):
        return False
    return isinstance(first, dict) and any(c in first for c in IMAGE_COLUMNS)


def _image_bytes(image) -> bytes:
    if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL
        return f"{image.mode}{image.size}".encode() + image.tobytes()
    if isinstance(image, dict):  # an undecoded datasets Image: its file bytes or its path
        return image.get("bytes") or str(image.get("path")).encode()
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if hasattr(image, "tobytes") and hasattr(image, "shape"):  # numpy
        return f"{image.dtype}{image.shape}".encode() + image.tobytes()
    return repr(image).encode()


def image_fingerprint(images: Sequence) -> str | None:
    """A digest of the images' contents (None without images): equal for equal images."""
    if not images:
        return None
    h = hashlib.blake2b(digest_size=16)
    for image in images:
        data = _image_bytes(image)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _prefix_key(prompt_text: str, images: Sequence) -> str | None:
    """The document key of an image prompt (``packing.PREFIX_KEY``): its text and its images; None without images
    (a text prompt shares by its tokens alone, as in text datasets)."""
    fingerprint = image_fingerprint(images)
    if fingerprint is None:
        return None
    return hashlib.blake2b(prompt_text.encode() + fingerprint.encode(), digest_size=16).hexdigest()


def _images_of(example: dict) -> list:
    if "images" in example:
        return [im for im in (example["images"] or []) if im is not None]
    image = example.get("image")
    return [] if image is None else [image]


def render_pair(example: dict, processor) -> tuple[str, str, str, list]:
    """(prompt, chosen, rejected, images) of a pair as TRL's vision collator renders it: image placeholders put into
    the first user message, the chat template applied (conversational data); text data is taken as it is."""
    from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

    images = _images_of(example)
    example = {k: v for k, v in example.items() if k not in IMAGE_COLUMNS}
    if is_conversational(example):
        example["prompt"] = prepare_multimodal_messages(example["prompt"], images=images)
        example["chosen"] = prepare_multimodal_messages(example["chosen"])
        example["rejected"] = prepare_multimodal_messages(example["rejected"])
        example = apply_chat_template(example, processor)
    return example["prompt"], example["chosen"], example["rejected"], images


def image_token_ids(processor) -> set[int]:
    """The token ids the model replaces with image features."""
    ids = getattr(processor, "image_token_ids", None) or [getattr(processor, "image_token_id", None)]
    return {i for i in ids if i is not None}


def _unpadded(out) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(out["input_ids"], out["attention_mask"])]


def tokenize_texts(processor, texts: list[str]) -> list[list[int]]:
    """Token ids of response texts, as TRL's vision collator gets them (the processor, no special tokens)."""
    out = processor(text=texts, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
    return _unpadded(out)


def process_prompts(processor, texts: list[str], images: list[list]) -> tuple[list[list[int]], dict, bool]:
    """Run the processor once on prompts and their images: (token ids of each prompt, the model's image inputs for
    all of them in order, whether the processor gives modality types ``mm_token_type_ids``)."""
    has_images = any(images)
    out = processor(images=images if has_images else None, text=texts, padding=True, padding_side="left",
                    return_tensors="pt", add_special_tokens=False)
    inputs = {k: v for k, v in out.items() if k not in _TEXT_KEYS} if has_images else {}
    return _unpadded(out), inputs, "mm_token_type_ids" in out


@dataclass
class VisionPackingCollator:
    """``PrefixPackingCollator`` for image preference data (module docstring): TRL's padded view plus one packed row;
    ``prefix_packed`` also holds ``model_inputs`` (the image inputs the model takes with the row: ``pixel_values``,
    ``image_grid_thw``, ``pixel_attention_mask``, ... as the processor makes them for the row's image documents in
    order), ``mm_token_type_ids`` [1, T] where the processor makes them (models with multi-axis rotary positions
    read them), and in ``stats`` the images and image tokens the row runs and TRL's counts of both."""

    processor: Any
    max_length: int | None = None
    prefix_sharing: bool = True

    def __post_init__(self):
        tok = self.processor.tokenizer
        # TRL's vision collator pads with the pad token, or the eos token without one.
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._view = DataCollatorForPreference(pad_token_id=pad, max_length=self.max_length,
                                               truncation_mode="keep_start")
        self._image_ids = image_token_ids(self.processor)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rendered = [render_pair(ex, self.processor) for ex in examples]
        chosen = tokenize_texts(self.processor, [r[1] for r in rendered])
        rejected = tokenize_texts(self.processor, [r[2] for r in rendered])
        keys = [_prefix_key(r[0], r[3]) for r in rendered]
        # The prompts the processor runs on, one per document that holds images: one per distinct prompt (text and
        # images) when documents are shared, else one per sequence (a document of its own each), in the order the
        # packed row lays its documents out.
        if self.prefix_sharing:
            entry_of: dict = {}
            for (text, _, _, images), key in zip(rendered, keys):
                entry_of.setdefault((text, key), (text, images))
            entries = list(entry_of.values())
            pair_entry = [list(entry_of).index((r[0], k)) for r, k in zip(rendered, keys)]
        else:
            entries = [(r[0], r[3]) for r in rendered for _ in range(2)]
            pair_entry = [2 * i for i in range(len(rendered))]
        prompts, image_inputs, has_types = process_prompts(self.processor, [e[0] for e in entries],
                                                           [list(e[1]) for e in entries])
        pairs = [{"prompt_ids": prompts[e], "chosen_ids": c, "rejected_ids": r, PREFIX_KEY: k}
                 for e, c, r, k in zip(pair_entry, chosen, rejected, keys)]
        batch = self._view(pairs)
        row = pack_pairs(pairs, self.max_length, "keep_start", self.prefix_sharing)
        packed = packed_inputs(batch, row, len(pairs))
        packed["model_inputs"] = image_inputs
        if has_types:
            packed["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids([row.input_ids]))
        ids = self._image_ids
        view_ids = batch["input_ids"][batch["attention_mask"].bool()].tolist()
        packed["stats"].update(
            images=sum(len(e[1]) for e in entries),
            unshared_images=2 * sum(len(r[3]) for r in rendered),
            image_tokens=sum(t in ids for t in row.input_ids),
            unshared_image_tokens=sum(t in ids for t in view_ids),
        )
        batch[PACKED_KEY] = packed
        return batch


def measure_vision_pairs(dataset, processor) -> list[dict]:
    """Every pair of an image dataset tokenized as the collator tokenizes it: ``prompt_ids`` (image tokens
    included), ``chosen_ids``, ``rejected_ids``, ``prefix_key``, and the pair's ``images`` and ``image_tokens``.

    Costs one processor run per pair (image decoding, resizing and normalization, as in one of the collator's
    calls for it), once per dataset: what the token budget and data-stats need to count a pair's packed length."""
    ids = image_token_ids(processor)
    out = []
    for i in range(len(dataset)):
        text, chosen, rejected, images = render_pair(dataset[i], processor)
        prompt = process_prompts(processor, [text], [images])[0][0]
        c, r = tokenize_texts(processor, [chosen, rejected])
        out.append({"prompt_ids": prompt, "chosen_ids": c, "rejected_ids": r, PREFIX_KEY: _prefix_key(text, images),
                    "images": len(images), "image_tokens": sum(t in ids for t in prompt)})
    return out


def _undecoded_images(dataset):
    """``dataset`` with its image columns left undecoded (file bytes or paths), where it is a ``datasets`` dataset
    with image features: hashing them is then cheap."""
    import datasets

    features = getattr(dataset, "features", None)
    if not isinstance(dataset, datasets.Dataset) or not features:
        return dataset

    def undecoded(feature):
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, datasets.List):
            return datasets.List(undecoded(feature.feature), length=feature.length)
        return feature

    for column in IMAGE_COLUMNS:
        if column in features and undecoded(features[column]) != features[column]:
            dataset = dataset.cast_column(column, undecoded(features[column]))
    return dataset


def vision_prompt_groups(dataset) -> list[list[int]]:
    """``grouping.prompt_groups`` for an image dataset: the pairs of each prompt, a prompt being its messages (or
    text) and its images (compared by their file bytes or paths, not decoded)."""
    import json

    from .batching import read_columns

    rows = _undecoded_images(dataset)
    names = getattr(rows, "column_names", None)
    rows = read_columns(rows, [c for c in ("prompt", *IMAGE_COLUMNS) if c in names]) if names else iter(rows)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        prompt = json.dumps(row.get("prompt"), sort_keys=True, default=repr)
        groups.setdefault((prompt, image_fingerprint(_images_of(row))), []).append(i)
    return list(groups.values())


def image_statistics(pairs: Sequence[dict], micro_batches: Sequence[Sequence[int]], max_length: int | None = None,
                     prefix_sharing: bool = True) -> dict:
    """What sharing saves on images, for pairs measured by :func:`measure_vision_pairs` in the trainer's
    micro-batches: image tokens TRL runs (every sequence's prompt) and the packed rows run (every document's
    prompt once), and the images each sends through the vision tower. Truncation is TRL's (``keep_start``)."""
    tokens_trl = tokens_packed = images_trl = images_packed = 0
    for batch in micro_batches:
        documents = set()
        for i in batch:
            pair = pairs[i]
            for seq, placement in enumerate(pair_placements(pair, max_length, "keep_start", prefix_sharing)):
                tokens_trl += pair["image_tokens"]
                images_trl += pair["images"]
                key = placement.document if placement.document is not None else ("own", i, seq)
                if key not in documents:
                    documents.add(key)
                    tokens_packed += pair["image_tokens"]
                    images_packed += pair["images"]
    return {
        "image_tokens_trl": tokens_trl,
        "image_tokens_packed": tokens_packed,
        "image_tokens_saved_frac": 1 - tokens_packed / tokens_trl if tokens_trl else 0.0,
        "images_trl": images_trl,
        "images_packed": images_packed,
    }


def vision_training_statistics(dataset, processor, args) -> dict:
    """``stats.training_statistics`` for an image dataset (what ``prefixdpo data-stats`` reports), plus
    :func:`image_statistics`: every pair measured with the processor, in the micro-batches the trainer draws in the
    first epoch. TRL drops no pair of an image dataset for ``max_length`` (it does not tokenize them)."""
    from .grouping import training_micro_batches
    from .stats import dataset_statistics

    pairs = measure_vision_pairs(dataset, processor)
    batches = training_micro_batches(pairs, args, groups=vision_prompt_groups(dataset))
    stats = dataset_statistics(pairs, batches, batch_size=args.per_device_train_batch_size,
                               max_length=args.max_length, truncation_mode="keep_start",
                               prefix_sharing=args.prefix_sharing)
    stats.update(image_statistics(pairs, batches, args.max_length, args.prefix_sharing))
    return stats
