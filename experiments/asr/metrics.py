"""The course's similarity metrics (SPEC section 3), with the package ``textdistance``.

Per sample, on token-id lists: the target (start token included) is cut after its first ``>``; the
prediction (the greedy output, start token included, as the course's ``generate`` returned it) is cut
after its first ``>``, and a prediction without ``>`` gets its last token replaced by ``>``. Then
``textdistance`` ``jaccard``, ``cosine`` and ``damerau_levenshtein`` ``normalized_similarity`` (Jaccard and
cosine compare bags of tokens). Values are averaged over samples.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from .tokenizer import STOP_ID

METRICS = ("jaccard", "cosine", "damerau_levenshtein")
METRIC_LABELS = {"loss": "Loss", "jaccard": "Jaccard", "cosine": "Cosine", "damerau_levenshtein": "Damerau-Levenshtein"}

__all__ = ["METRICS", "METRIC_LABELS", "cut_pair", "similarities", "sum_similarities"]


def cut_pair(target: Sequence[int], prediction: Sequence[int]) -> Tuple[List[int], List[int]]:
    target, prediction = [int(t) for t in target], [int(p) for p in prediction]
    if STOP_ID in target:
        target = target[: target.index(STOP_ID) + 1]
    if STOP_ID in prediction:
        prediction = prediction[: prediction.index(STOP_ID) + 1]
    elif prediction:
        prediction[-1] = STOP_ID
    return target, prediction


def similarities(target: Sequence[int], prediction: Sequence[int]) -> Dict[str, float]:
    import textdistance  # imported here so that the command lines (--help) work without it

    t, p = cut_pair(target, prediction)
    return {
        "jaccard": textdistance.jaccard.normalized_similarity(t, p),
        "cosine": textdistance.cosine.normalized_similarity(t, p),
        "damerau_levenshtein": textdistance.damerau_levenshtein.normalized_similarity(t, p),
    }


def sum_similarities(targets, predictions) -> Dict[str, float]:
    """Sums over a batch (``[B, L]`` tensors or lists); divide by the sample count for the mean."""
    totals = dict.fromkeys(METRICS, 0.0)
    for t, p in zip(targets.tolist() if hasattr(targets, "tolist") else targets,
                    predictions.tolist() if hasattr(predictions, "tolist") else predictions):
        for k, v in similarities(t, p).items():
            totals[k] += v
    return totals
