"""OCR with RapidOCR: PP-OCR text detection and recognition on ONNX Runtime.

The ``rapidocr`` wheel ships its models, so this specialist works offline. Each text
line becomes an ``ocr`` region: its quadrilateral (clockwise from top-left), the box
around it, the read text and the recognition score.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np

from engine.config import SpecialistConfig
from engine.records import Region
from specialists.base import Annotations, Specialist, SpecialistInput


class RapidOCRSpecialist(Specialist):
    produces = frozenset({"ocr"})

    def __init__(
        self, config: SpecialistConfig, min_detection_score: float = 0.5, threads: int = 0
    ) -> None:
        """``min_detection_score``: RapidOCR's own text-box threshold, below which it
        does not even try to read a region; recognition scores are kept, not filtered.
        ``threads``: ONNX Runtime's threads per actor; 0 = the actor's ``num_cpus``
        (at least one), so the actors of a pool share the cores instead of each spinning
        a thread per core; -1 = ONNX Runtime's own default, one per core."""
        super().__init__(config)
        self.min_detection_score = min_detection_score
        self.threads = threads or max(1, round(config.num_cpus))
        self._engine = None

    @property
    def model_revision(self) -> str:
        return f"rapidocr@{version('rapidocr')}"

    def setup(self) -> None:
        from rapidocr import RapidOCR

        # Keep every recognised line: thresholds belong to the filter stage. RapidOCR logs
        # each model file it loads (INFO) and each image without text (WARNING) between
        # the progress bars; an image without text is an empty result, not a problem. It
        # sets its logger's level from this option in its constructor, so only the option
        # quiets it.
        self._engine = RapidOCR(
            params={
                "Global.text_score": 0.0,
                "Det.box_thresh": self.min_detection_score,
                "Global.log_level": "error",
                "EngineConfig.onnxruntime.intra_op_num_threads": self.threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
        )

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        # PP-OCR runs one image at a time: detection output sizes differ per image.
        return [self._read(np.asarray(item.image)) for item in batch]

    def _read(self, pixels: np.ndarray) -> Annotations:
        result = self._engine(pixels)
        if result.boxes is None:
            return Annotations()
        regions = []
        for quad, text, score in zip(result.boxes, result.txts, result.scores, strict=True):
            xs, ys = quad[:, 0], quad[:, 1]
            box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
            flat = [float(v) for point in quad for v in point]
            regions.append(Region(box, text, "ocr", source="", score=float(score), quad=flat))
        return Annotations(regions=regions)
