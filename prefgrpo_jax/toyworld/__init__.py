"""Toy text-to-image world with verifiable ground truth.

Prompts over a tiny vocabulary (colours, shapes, counts, sizes, spatial
relations), a deterministic anti-aliased renderer and a pixel-level verifier
that scores images with binary testpoints per prompt, UniGenBench style. It
makes Pref-GRPO's claims (win-rate rewards resist reward hacking) measurable
on a CPU: images can be scored exactly, without a judge model.
"""

from prefgrpo_jax.toyworld.render import coverage, render, render_batch
from prefgrpo_jax.toyworld.scenes import (
    BACKGROUND,
    COLOURS,
    DIMENSIONS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SIZE_SHAPE,
    NUMBERS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
    all_prompts,
    heldout_prompts,
    is_heldout,
    make_prompt,
    parse_prompt,
    prompt_pool,
    sample_prompt,
    sample_scene,
)
from prefgrpo_jax.toyworld.verify import (
    Detection,
    Testpoint,
    detect_objects,
    score_table,
    testpoints,
    verify,
    verify_batch,
)

__all__ = [
    "BACKGROUND", "COLOURS", "DIMENSIONS", "HELDOUT_COLOUR_SHAPE", "HELDOUT_SIZE_SHAPE",
    "NUMBERS", "RELATIONS", "SHAPES", "SIZES", "Detection", "ObjectSpec", "PromptSpec",
    "Scene", "SceneObject", "Testpoint", "all_prompts", "coverage", "detect_objects",
    "heldout_prompts", "is_heldout", "make_prompt", "parse_prompt", "prompt_pool",
    "render", "render_batch", "sample_prompt", "sample_scene", "score_table",
    "testpoints", "verify", "verify_batch",
]
