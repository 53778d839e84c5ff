"""R@K from score matrices: one definition for the global (retrieval.py) and the dense
(dense.py) evaluators, so neither imports the other."""
import torch

RECALL_K = (1, 5, 10)


def recall_at_k(i2t, t2i, text_to_image, recall_k=RECALL_K):
    """R@K both ways from image->text [Ni, Nt] and text->image [Nt, Ni] scores (global or dense)."""
    positives = torch.zeros(t2i.shape, dtype=torch.bool, device=t2i.device)
    positives[torch.arange(len(t2i), device=t2i.device), text_to_image.to(t2i.device)] = True
    metrics = {}
    for key, s, p in (("i2t", i2t, positives.T), ("t2i", t2i, positives)):
        for k in recall_k:
            top = s.topk(min(k, s.shape[1]), dim=1).indices  # K >= #candidates: all of them
            hits = p.gather(1, top).any(dim=1)
            metrics[f"{key}_R@{k}"] = 100.0 * hits.sum().item() / len(hits)
    metrics["rsum"] = sum(metrics.values())
    return metrics
