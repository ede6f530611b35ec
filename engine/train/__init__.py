"""The Florence-VL trainer: Florence-2 features, Depth-Breadth Fusion, projector and LLM.

- ``config.py``: the ``train:`` section of an engine config.
- ``tiny.py``: tiny random-initialised Florence-2 and causal LM with local tokenizers.
- ``model.py``: the vision tower (depth + breadth features), the projectors, the model.
- ``instructions.py``: conversations made from one FLD record (captions for stage 1;
  regions, grounding, referring expressions, counting and OCR for stage 2).
- ``data.py``: those conversations read from the engine's WebDataset shards (and LLaVA
  JSON), tokenised with only the answers in the loss.
- ``inputs.py``: the shards (a committed round's export) and output of a run.
- ``stream.py``: a rank's resumable stream of conversations; the held-out images.
- ``recipe.py``: stage 1 / stage 2 training on one device or data-parallel.
- ``checkpoint.py``: checkpoints committed by a marker, for exact resume and inference.
- ``inference.py``: answer a question about an image with a trained checkpoint.
"""
