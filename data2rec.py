"""Turn (image, web text, synthetic caption) triples into ALIP RecordIO shards.

    python data2rec.py --manifest rows.jsonl --image-root imgs/ --output-dir shards/ [--workers 8]
    python data2rec.py --wds 'tars/*.tar' --captions captions.jsonl --output-dir shards/
    python data2rec.py --rec old_shards/ --captions captions.jsonl --output-dir shards/  # new captions
    python data2rec.py verify shards/ [--workers 8]      # check every shard; exit 1 on any problem

Writes train-NNNNN.rec/.idx, manifest.json and rejects.jsonl; rerun the same command to complete
an interrupted run. See alip/data/pack.py for the behaviour.
"""
import sys

from alip.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
