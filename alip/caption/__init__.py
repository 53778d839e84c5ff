"""Synthetic captions at scale: sources -> captioner backends -> a chunked, resumable writer.

``caption.py`` (repo root) is the CLI; ``run.caption_dataset`` is the whole pipeline.
"""
