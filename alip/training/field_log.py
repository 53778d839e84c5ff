"""How often each shard field fed a text slot drawn from several (``--raw-fields raw,caption``
with or without ``--raw-field-probs``): the loaders put, per drawn slot, an int64 [B] tensor of
the field each sample read under ``<slot>@field`` (``alip.data.text_views.drawn_views``); the
trainer takes those keys out of each batch it trains on, counts them on the device, and at the
end of an epoch sums the counts over the ranks into the epoch's ``field_fractions`` record. The
counts of the epoch so far are checkpointed per rank, so a run resumed mid-epoch reports the
whole epoch."""
import torch

from alip.data.text_views import DRAWN, drawn_views

from .distributed import all_gather_object


class FieldCounts:
    """Per drawn slot, the number of samples that read each of its fields this epoch."""

    def __init__(self, spec, device, saved=None):
        self.views = drawn_views(spec.text_views)
        self.device = device
        self.reset()
        if saved:
            self.load(saved)

    def reset(self):
        self.counts = {k: torch.zeros(len(v.sources), dtype=torch.int64, device=self.device)
                       for k, v in self.views.items()}

    def take(self, batch):
        """Remove the drawn-field keys from ``batch`` (the step never sees them) and count them."""
        for key in [k for k in batch if k.endswith(DRAWN)]:
            index = batch.pop(key)
            if key in self.counts:
                self.counts[key] += torch.bincount(index.to(self.device).view(-1),
                                                   minlength=len(self.views[key].sources))

    def state(self):
        """This rank's counts so far: {key: [int, ...]} (for a checkpoint)."""
        return {k: c.tolist() for k, c in self.counts.items()}

    def load(self, state):
        for k, c in state.items():
            if k in self.counts and len(c) == len(self.counts[k]):
                self.counts[k] = torch.tensor(c, dtype=torch.int64, device=self.device)

    def epoch_record(self, info):
        """{"field_fractions": {slot: {field: fraction}}, "field_counts": {slot: {field: n}}}
        summed over every rank (a collective: every rank calls it), or {} with nothing drawn;
        the counts restart for the next epoch."""
        if not self.views:
            return {}
        per_rank = all_gather_object(self.state(), info)
        fractions, counts = {}, {}
        for key, view in self.views.items():
            total = [sum(r[key][j] for r in per_rank) for j in range(len(view.sources))]
            slot = key[:-len(DRAWN)]
            counts[slot] = dict(zip(view.sources, total))
            n = sum(total)
            fractions[slot] = {f: (c / n if n else 0.0) for f, c in zip(view.sources, total)}
        self.reset()
        return {"field_fractions": fractions, "field_counts": counts}
