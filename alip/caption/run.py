"""The captioning run: rows -> DataLoader workers (read + decode + preprocess) -> captioner -> chunks.

Rows are cut into chunks of ``chunk_size`` consecutive rows; chunk c belongs to part ``c % N``
of ``--part I/N`` and, within a part, to process ``j % W`` of the W processes that share the
part (j = the chunk's position in the part; ``process_slot``: without --part, all processes of
the launch by RANK / WORLD_SIZE; with --part, a part per machine, its processes by LOCAL_RANK /
LOCAL_WORLD_SIZE). Each process captions its chunks in batches that never straddle a chunk, so
a chunk's captions do not depend on who made them, and writes each chunk whole. No collectives:
a process that finds every chunk written assembles the output unless another holds the assembly
lock or it is assembled already (``writer.assemble_once``; identical bytes whoever does it).
"""
import io
import math
import os
import signal

import torch
from PIL import Image, ImageOps

from ..data.pack import _gray16_to_8, undecodable
from . import writer
from .backends import output_generation
from .sources import DataError, Reject

ASSEMBLING_ELSEWHERE = "assembling elsewhere"  # caption_dataset: every chunk is written, another process assembles
KILL_HOOK = "ALIP_CAPTION_TEST_KILL_AFTER_CHUNKS"  # tests: SIGKILL this process after k chunks


def decode_image(data):
    """RGB PIL image, EXIF orientation applied, 16-bit grayscale scaled to 8 bits (data2rec's own
    ``_gray16_to_8``: the captioner sees what data2rec stores); raise Reject if undecodable, with
    data2rec's reason (``pack.undecodable``: failed.jsonl and rejects.jsonl agree)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # as data2rec's encode_image
            img = _gray16_to_8(img)
        return img.convert("RGB") if img.mode != "RGB" else img
    except Exception as e:  # Pillow raises many types for bad files
        raise undecodable(e) from None


class _DieWith:
    """DataLoader worker_init_fn: the worker ends with caption.py at once (``procs.die_with_parent``),
    even mid-read, not only at torch's next 5-second check of its parent."""

    def __init__(self, parent):
        self.parent = parent

    def __call__(self, worker_id):
        from ..procs import die_with_parent
        die_with_parent(self.parent)


class RowImages(torch.utils.data.Dataset):
    """Row i -> (i, preprocessed image, None) or (i, None, reason). Runs in DataLoader workers."""

    def __init__(self, source, preprocess):
        self.source, self.preprocess = source, preprocess

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            img = decode_image(self.source.image_bytes(i))
        except Reject as e:
            return i, None, str(e)
        try:
            return i, self.preprocess(img), None
        except Exception as e:
            return i, None, f"preprocessing failed: {type(e).__name__}: {e}"


def _collate(items):
    return items


class ChunkBatches:
    """The DataLoader's batch sampler: the rows of chunks ``todo`` in batches of ``batch_size`` that
    never straddle a chunk, made as the loader asks for them (memory does not grow with the rows)."""

    def __init__(self, todo, n, chunk_size, batch_size):
        self.todo, self.n, self.chunk_size, self.batch_size = todo, n, chunk_size, batch_size
        self.rows = sum(self._end(c) - c * chunk_size for c in todo)
        self.count = sum(-(-(self._end(c) - c * chunk_size) // batch_size) for c in todo)

    def _end(self, c):
        return min(self.n, (c + 1) * self.chunk_size)

    def __iter__(self):
        for c in self.todo:
            end = self._end(c)
            for b in range(c * self.chunk_size, end, self.batch_size):
                yield list(range(b, min(end, b + self.batch_size)))

    def __len__(self):
        return self.count


def my_chunks(num_chunks, part, rank, world_size):
    """The chunks of process ``rank`` of the ``world_size`` processes sharing ``part`` (``process_slot``)."""
    i, n = part
    return list(range(i, num_chunks, n))[rank::world_size]


def process_slot(part, env=None):
    """(j, W, label): this process is number j of the W processes that share its part.

    Without ``--part`` (N == 1) the part is the whole launch: RANK / WORLD_SIZE, so one torchrun
    over many nodes splits the chunks over all its processes. With ``--part I/N`` (N > 1) a part
    is one machine's: LOCAL_RANK / LOCAL_WORLD_SIZE, so each machine (each node of a multi-node
    torchrun, or a separate launch per machine) given its own I covers its part whatever the
    global ranks. Over all parts and processes every chunk is captioned exactly once.
    """
    env = os.environ if env is None else env
    i, n = part
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    if n == 1:
        j, w, label = rank, world, f"rank {rank}/{world}"
    elif world == 1:
        j, w, label = 0, 1, f"part {i}/{n}"
    elif "LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env:
        j, w = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
        label = f"part {i}/{n} local rank {j}/{w}"
    else:
        raise ValueError(f"--part {i}/{n} with {world} processes needs LOCAL_RANK and LOCAL_WORLD_SIZE "
                         "(torchrun sets them): a part is one machine's, split over its local processes")
    if not 0 <= j < w:
        raise ValueError(f"process {j} of {w}: the rank must be in 0..{w - 1}")
    return j, w, label


def clean(caption):
    """One line, single spaces: captions go into JSONL/TSV and tokenizers."""
    return " ".join(caption.split())


def caption_batch(captioner, items, source, seed):
    """[(row, key, caption)], [(row, key, reason, where)] for one batch of dataset items."""
    good = [(i, x) for i, x, err in items if err is None]
    failed = [(i, source.key(i), err, source.where(i)) for i, x, err in items if err is not None]
    captions = []
    if good:
        torch.manual_seed(seed * 1_000_003 + good[0][0])  # sampling: fixed per batch, not per process
        texts = captioner(captioner.collate([x for _, x in good]))
        if len(texts) != len(good):
            raise RuntimeError(f"captioner returned {len(texts)} captions for {len(good)} images")
        for (i, _), text in zip(good, texts):
            text = clean(text)
            if text:
                captions.append((i, source.key(i), text))
            else:
                failed.append((i, source.key(i), "empty caption generated", source.where(i)))
    return captions, failed


def make_plan(source, captioner_description, gen, batch_size, chunk_size):
    """What plan.json records: the input and every setting that changes a caption. Made from the
    flags (``backends.plan_description``), so caption.py checks it before the model is loaded."""
    generation = output_generation(captioner_description.get("backend"), gen)
    settings = {"captioner": captioner_description, "generation": generation,
                "batch_size": batch_size, "chunk_size": chunk_size}
    return {"tool_version": writer.TOOL_VERSION, "rows": len(source), "inputs": source.describe(),
            "settings": settings}


def caption_dataset(source, captioner, gen, output_dir, batch_size=64, chunk_size=1000, workers=4,
                    part=(0, 1), rank=0, world_size=1, command=None, progress=True, plan=None):
    """Caption this process's share of ``source`` into ``output_dir``; returns the summary when
    every chunk is written (then captions.jsonl & co are assembled, by this process or before),
    ``ASSEMBLING_ELSEWHERE`` when another process is assembling them, else None. ``plan``: from
    ``make_plan`` (caption.py checked it before loading the model); None: made here from
    ``captioner.describe()``."""
    from tqdm import tqdm

    n = len(source)
    if plan is None:
        plan = make_plan(source, captioner.describe(), gen, batch_size, chunk_size)
    writer.check_spare_inputs(output_dir, source)
    writer.check_plan(output_dir, plan)
    fp = writer.fingerprint(plan)
    num_chunks = max(1, math.ceil(n / chunk_size))
    todo = [c for c in my_chunks(num_chunks, part, rank, world_size) if not writer.chunk_done(output_dir, c, fp)]
    batches = ChunkBatches(todo, n, chunk_size, batch_size)
    loader = torch.utils.data.DataLoader(
        RowImages(source, captioner.preprocess), batch_sampler=batches, collate_fn=_collate,
        num_workers=workers, pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
        persistent_workers=False, worker_init_fn=_DieWith(os.getpid()) if workers else None)
    kill_after = int(os.environ.get(KILL_HOOK, "0"))
    bar = tqdm(total=batches.rows, unit="img", desc=f"caption rank {rank}",
               disable=not progress, smoothing=0.05)
    done_chunks, acc = 0, ([], [])
    try:
        for items in loader:
            captions, failed = caption_batch(captioner, items, source, gen.seed)
            acc[0].extend(captions)
            acc[1].extend(failed)
            bar.update(len(items))
            c = items[0][0] // chunk_size  # a batch never straddles a chunk
            if items[-1][0] + 1 == min(n, (c + 1) * chunk_size):  # the chunk's last batch
                writer.write_chunk(output_dir, c, fp, c * chunk_size, min(n, (c + 1) * chunk_size), *acc)
                acc = ([], [])
                done_chunks += 1
                if done_chunks == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
    if n == 0 and not writer.chunk_done(output_dir, 0, fp) and 0 in my_chunks(1, part, rank, world_size):
        writer.write_chunk(output_dir, 0, fp, 0, 0, [], [])
    if not all(writer.chunk_done(output_dir, c, fp) for c in range(num_chunks)):
        return None
    try:
        summary = writer.assemble_once(output_dir, num_chunks, n, source, plan, command,
                                       {"captioner": captioner.describe(), "generation": gen.asdict()})
    except Exception as e:  # the chunks are the work done: say they are kept and how to finish
        why = " ".join(str(e).split())  # one line
        raise DataError(f"{output_dir}: assembling the outputs failed ({type(e).__name__}: {why}); the "
                        f"{num_chunks} chunk file(s) in {os.path.join(output_dir, 'chunks')} are kept: "
                        "rerun the same command to assemble them") from e
    return ASSEMBLING_ELSEWHERE if summary is None else summary
