"""The generated demo world: scenes of coloured shapes and signs with their exact truth.

Used by the demo, the evaluation and the benchmarks to measure the engine against
annotations known exactly; no stage imports it. ``generate.py`` lays scenes out and
writes images with ``truth.jsonl``, ``drawing.py`` draws them, ``captions.py`` describes
them at three granularities with grounded phrases.
"""

from engine.world.generate import WorldPaths, generate_world, load_truth, render_image

__all__ = ["WorldPaths", "generate_world", "load_truth", "render_image"]
