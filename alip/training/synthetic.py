"""Deterministic random data with the ``build_train_loader`` contract (``--dataset-type
synthetic``): for benchmarks and smoke tests, like open_clip_train's synthetic dataset.

Sample ``i`` is a fixed function of (seed, i): a N(0,1) image and two token rows
``[SOT, random ids..., EOT, 0...]`` (raw text 5-40 tokens, caption 10-25). Each epoch visits
the samples in a permutation of (seed, epoch); global batch ``b`` is positions
``[b*B*W, (b+1)*B*W)`` of it and rank ``r`` gets the ``r``-th slice of B, so W processes with
batch B see exactly the batches of one process with batch W*B.

It yields dicts keyed by ``spec.keys`` (a ``DataSpec``; the default ``ALIP_DATA``: "image",
"raw", "caption"): the first image view is sample i's
image, view k > 0 another N(0,1) image fixed by (seed, i, k) (no augmentation; the views only
need to differ), the asked-for token rows, and the text views through their registered
transforms, seeded by (seed, epoch, i, view name) as in the readers.
"""
import torch

from alip.data import text_views
from alip.data.spec import ALIP_DATA

SOT, EOT, CONTEXT = 49406, 49407, 77
SYNTHETIC_FIELDS = ("raw", "caption")


def _tokens(gen, lo, hi):
    n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    row = torch.zeros(CONTEXT, dtype=torch.int64)
    row[0] = SOT
    row[1:n - 1] = torch.randint(1, 49405, (n - 2,), generator=gen)
    row[n - 1] = EOT
    return row


def synthetic_sample(seed, index, image_size):
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    image = torch.randn(3, image_size, image_size, generator=gen)
    return image, _tokens(gen, 5, 40), _tokens(gen, 10, 25)


class SyntheticLoader:
    def __init__(self, num_samples, batch_size, image_size, rank=0, world_size=1, seed=0,
                 device="cpu", spec=ALIP_DATA):
        self.num_samples, self.batch_size, self.image_size = num_samples, batch_size, image_size
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        global_batch = batch_size * world_size
        self.batches_per_epoch = num_samples // global_batch
        self.dropped_per_epoch = num_samples - self.batches_per_epoch * global_batch
        self.epoch, self.start_batch = 0, 0
        text_views.check(spec.text_views)
        extra = [f for f in spec.fields_read if f not in SYNTHETIC_FIELDS]
        if extra:
            raise ValueError(f"--dataset-type synthetic has the text fields {', '.join(SYNTHETIC_FIELDS)}; "
                             f"this method also reads {', '.join(extra)} (use real shards with "
                             f"data2rec.py --text-fields)")
        self.spec = spec

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        order = torch.randperm(self.num_samples,
                               generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch))
        b, w = self.batch_size, self.world_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * b * w + self.rank * b
            samples = [synthetic_sample(self.seed, int(i), self.image_size)
                       for i in order[first:first + b]]
            images, raw, cap = (torch.stack(x) for x in zip(*samples))
            indices = [int(i) for i in order[first:first + b]]
            yield {k: v.to(self.device) for k, v in self._views(images, raw, cap, indices).items()}

    def _views(self, images, raw, cap, indices):
        fields = {"raw": raw, "caption": cap}
        out = {self.spec.image_views[0].name: images}
        for k, v in enumerate(self.spec.image_views[1:], start=1):
            out[v.name] = torch.stack([torch.randn(
                images.shape[1:], generator=torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + i) * 131 + k)) for i in indices])
        out.update((f, fields[f]) for f in self.spec.text_fields)
        out.update(text_views.apply_batch(self.spec.text_views, fields, self.seed, self.epoch, indices))
        return out
