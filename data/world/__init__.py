"""The concept world: procedural images with exact labels, and the vocabulary of their captions.

Importing this package (``t2c.data.world.generator`` / ``t2c.data.world.vocab``) never imports torch. The
models trained on it live in the indexer layer (``t2c.indexer.world``).
"""
from __future__ import annotations

from t2c.data.world.generator import (
    Scene,
    WorldObject,
    concept_truth,
    generate,
    parse_weights,
    render,
    sample_dataset,
    sample_scene,
    scene_rng,
)
from t2c.data.world.vocab import PROMPT_TEMPLATES, parse_concept

__all__ = [
    "PROMPT_TEMPLATES", "Scene", "WorldObject", "concept_truth", "generate", "parse_concept",
    "parse_weights", "render", "sample_dataset", "sample_scene", "scene_rng",
]
