#!/usr/bin/env python
"""Train ALIP (or the CLIP baseline) on open_clip. One process: ``python train.py ...``;
several: ``torchrun --nproc_per_node N train.py ...``. See ``--help`` and configs/."""
import sys

from alip.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
