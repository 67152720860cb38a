"""The recall@k-vs-k counts behind training's TensorBoard figure agree with val/recall@k's."""
from __future__ import annotations

from training.evaluation.figures import recall_curve
from training.evaluation.metrics import recall_hit_curve, recall_hits
from training.lit.recall_figure import recall_image


def test_hit_curve_is_recall_at_every_k():
    ranks = [0, 2, None, 9, 4, 4, 1]
    counts = recall_hit_curve(ranks, 10)
    hits = recall_hits(ranks, (1, 5), 10)
    assert counts[0] == hits["recall@1"] and counts[4] == hits["recall@5"]
    assert [c / len(ranks) for c in counts] == recall_curve(ranks, 10)
    image = recall_image([c / len(ranks) for c in counts], "recall@k")
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8" and image.min() < image.max()
