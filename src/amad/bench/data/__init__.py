"""Generated data for the offline demo: the "Shapes" dataset (VQA, captioning, En-De translation)."""

from __future__ import annotations

from .collate import BlipCaptionCollator, Seq2SeqCollator, VQACollator, pixel_values
from .questions import ANSWER_TO_ID, ANSWERS, QUESTION_TYPES
from .scenes import COLOURS, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, render_scene, sample_scene
from .shapes import (
    SPLITS,
    TASK_PREFIX,
    ShapesConfig,
    build_shapes_tokenizer,
    caption_view,
    generate_shapes,
    load_shapes,
    save_shapes,
    translation_view,
    vqa_view,
)
from .tokenizer import build_tokenizer

__all__ = [
    "ANSWERS", "ANSWER_TO_ID", "COLOURS", "QUESTION_TYPES", "RELATIONS", "SHAPES", "SIZES", "SPLITS", "TASK_PREFIX",
    "BlipCaptionCollator", "Scene", "Seq2SeqCollator", "ShapeObject", "ShapesConfig", "VQACollator",
    "build_shapes_tokenizer", "build_tokenizer", "caption_view", "generate_shapes", "load_shapes", "pixel_values",
    "render_scene", "sample_scene", "save_shapes", "translation_view", "vqa_view",
]
