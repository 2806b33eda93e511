"""Per-process caches: one model load per (preset, device, dense CLIP mode) and one text encoding per vocabulary.

A worker labels many shards; loading CLIP and SAM (seconds to minutes for real weights) and encoding the
vocabulary must happen once per process, not once per shard.
"""

from __future__ import annotations

from typing import Any

import torch

from fmbseg.device import resolve_device
from fmbseg.vocab import Vocabulary

_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_TEXT: dict[tuple, torch.Tensor] = {}
_LOADS = [0]  # models built by get_models in this process (shows that a worker reuses its models)


def _key(preset: str, device: str | torch.device, dense_mode: str) -> tuple[str, str, str]:
    return preset, str(resolve_device(device)), dense_mode


def get_models(preset: str, device: str | torch.device = "auto", dense_mode: str = "maskclip") -> tuple[Any, Any]:
    """(ClipModel, SamModel) of `preset` on `device`, CLIP with `dense_mode`, built and loaded once per process."""
    key = _key(preset, device, dense_mode)
    if key not in _MODELS:
        from fmbseg.presets import make_clip, make_sam

        dev = resolve_device(device)
        _MODELS[key] = (make_clip(preset, dev, dense_mode=dense_mode), make_sam(preset, dev))
        _LOADS[0] += 1
    return _MODELS[key]


def load_count() -> int:
    """How many (CLIP, SAM) pairs `get_models` has built in this process so far."""
    return _LOADS[0]


def register_models(preset: str, device: str | torch.device, clip: Any, sam: Any) -> None:
    """Use these models for (preset, device, clip.dense_mode) in this process (benchmarks with randomly
    initialised weights)."""
    _MODELS[_key(preset, device, getattr(clip, "dense_mode", "maskclip"))] = (clip, sam)


def clear() -> None:
    _MODELS.clear()
    _TEXT.clear()


def text_embeddings(clip: Any, vocabulary: Vocabulary, templates: tuple[str, ...] = ("a photo of a {}.",)) -> torch.Tensor:
    """(K, D) L2-normalised text embeddings of the vocabulary (synonyms averaged), once per process."""
    key = (id(clip), clip.model_id, vocabulary.names, vocabulary.synonyms, tuple(templates))
    if key not in _TEXT:
        prompts = [p[0] if len(p) == 1 else p for p in vocabulary.prompts()]
        with torch.no_grad():
            _TEXT[key] = clip.encode_text(prompts, tuple(templates))
    return _TEXT[key]
