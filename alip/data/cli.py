"""data2rec.py's command line: argument parsing, the input source it names, and the run
(alip.data.pack) with its one-line errors. data2rec.py at the repository root calls ``main``;
so does the demo world, without importing the script.
"""
import argparse
import os
import shlex
import sys

DESCRIPTION = "Turn (image, web text, synthetic caption) triples into ALIP RecordIO shards."


def parse_args(argv):
    p = argparse.ArgumentParser(prog="data2rec.py", description=DESCRIPTION)
    src = p.add_argument_group("input (a manifest; or webdataset tars or rec shards + a captions file)")
    src.add_argument("--manifest", help="JSONL, CSV or TSV with image path, raw text and caption columns")
    src.add_argument("--image-root", default=".", help="directory the manifest's image paths are relative to")
    src.add_argument("--image-col", default="image")
    src.add_argument("--text-col", default="text")
    src.add_argument("--caption-col", default="caption")
    src.add_argument("--text-fields", default=None, metavar="raw,caption[:N][,F...]",
                     help="the label's text fields in order: raw (--text-col / KEY.txt), caption "
                          "(--caption-col) and any extra field F, read from the manifest's column F "
                          "(--wds: the --captions file's column F); a missing or empty F rejects the row. "
                          "A field may carry its context, F:N: its tokens are stored N wide (e.g. "
                          "caption:256 for long captions; default: the --tokenizer's context, 77 for "
                          "CLIP's); manifest.json records each width and how many texts were cut. "
                          "Default raw,caption; --rec: the input shards' fields, every one kept")
    src.add_argument("--wds", help="glob of img2dataset-style tars (KEY.jpg + KEY.txt [+ KEY.json])")
    src.add_argument("--rec", help="rec shards (a directory or a glob of .rec) to repack with the captions of "
                                    "--captions, keyed by record key (caption.py --rec writes them): each record "
                                    "keeps its key, JPEG (as with --copy-jpeg) and raw tokens")
    src.add_argument("--captions", help="with --wds / --rec: JSONL/CSV/TSV of synthetic captions keyed by KEY "
                                        "(--rec: the record key)")
    src.add_argument("--key-col", default="key", help="with --captions: the KEY column")
    src.add_argument("--max-row-lines", type=int, default=None,
                     help="CSV: a quoted field may span at most N physical lines (default 8); a record that "
                          "runs longer (an unbalanced quote) is rejected at its first line and reading goes "
                          "on at the next line")
    src.add_argument("--caption-fallback", choices=["raw"], default=None,
                     help="use the raw text where a caption is missing or empty (counted), "
                          "instead of stopping (missing) or rejecting the row (empty)")
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", required=True)
    out.add_argument("--shard-size", type=int, default=10000, help="rows of the shuffled input per shard")
    out.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    out.add_argument("--no-shuffle", action="store_true", help="keep input order (DALI shuffles only locally)")
    out.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    out.add_argument("--max-size", type=int, default=0,
                     help="cap the shorter image side at N pixels (aspect kept; 0 = no cap)")
    out.add_argument("--copy-jpeg", action="store_true",
                     help="store RGB JPEGs already within --max-size byte-for-byte (no re-encode)")
    out.add_argument("--tokenizer", default="ALIP-ViT-B-32", help="open_clip model name whose tokenizer to use")
    out.add_argument("--workers", type=int, default=1, help="processes decoding/encoding images")
    out.add_argument("--part", default="0/1", metavar="I/N",
                     help="build only shards k with k %% N == I (N machines, one shared --output-dir); "
                          "the run that completes the last shard writes manifest.json")
    out.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if sum(map(bool, (args.manifest, args.wds, args.rec))) != 1:
        p.error("give exactly one of --manifest, --wds or --rec")
    for flag in ("wds", "rec"):
        if getattr(args, flag) and not args.captions:
            p.error(f"--{flag} needs --captions")
    if args.rec:
        args.copy_jpeg = True  # the images are packed JPEGs already: decoded to check, kept as they are
    if args.max_row_lines is not None and args.max_row_lines < 1:
        p.error("--max-row-lines must be >= 1")
    if args.shard_size < 1 or args.workers < 1 or not 1 <= args.quality <= 100 or args.max_size < 0:
        p.error("--shard-size and --workers must be >= 1, --quality in 1..100, --max-size >= 0")
    from alip.cli import parse_part  # here: --help need not import torch
    try:
        args.part = parse_part(args.part)
    except ValueError as e:
        p.error(str(e))
    from alip.data.pack import DataError, check_text_fields, check_tokenizer, parse_text_fields
    args.text_context = {}
    try:
        if args.text_fields is not None:
            args.text_fields, args.text_context = parse_text_fields(args.text_fields)
        elif not args.rec:  # --rec: the input shards' fields (RecSource reads them)
            args.text_fields = ("raw", "caption")
        if args.text_fields is not None:
            check_text_fields(args.text_fields, [f for f in args.text_fields if f not in ("raw", "caption")])
        check_tokenizer(args.tokenizer)
    except DataError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    from alip.data.pack import DEFAULT_MAX_ROW_LINES, DataError, ManifestSource, WebDatasetSource, run

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        from alip.data.verify import main as verify_main
        return verify_main(argv[1:], prog="data2rec.py verify")
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    extra = tuple(f for f in args.text_fields or () if f not in ("raw", "caption"))
    try:
        if args.manifest:
            source = ManifestSource(args.manifest, args.image_root, args.image_col, args.text_col,
                                    args.caption_col, args.caption_fallback,
                                    args.max_row_lines or DEFAULT_MAX_ROW_LINES, extra)
        elif args.wds:
            source = WebDatasetSource(args.wds, args.captions, args.key_col, args.caption_col,
                                      args.caption_fallback, extra)
        else:
            from alip.data.rec_source import RecSource
            source = RecSource(args.rec, args.captions, args.text_fields, args.key_col,
                               args.caption_col, args.caption_fallback, args.tokenizer)
            args.text_fields = source.text_fields
            if source.dropped:  # asked for: said, never silent
                print(f"data2rec: note: --text-fields {','.join(args.text_fields)} leaves out the input "
                      f"shards' field(s) {list(source.dropped)}", file=sys.stderr)
            inputs = {os.path.dirname(os.path.realpath(p)) for p in source.shards.paths}
            if os.path.realpath(args.output_dir) in inputs:
                raise DataError(f"--output-dir {args.output_dir} holds the --rec input shards; "
                                "write the repacked shards to another directory")
        s = run(source, args.output_dir, shard_size=args.shard_size, workers=args.workers,
                quality=args.quality, max_size=args.max_size, copy_jpeg=args.copy_jpeg,
                shuffle=not args.no_shuffle, seed=args.seed, caption_fallback=args.caption_fallback,
                tokenizer=args.tokenizer, command=shlex.join(["data2rec.py", *argv]),
                progress=not args.no_progress, part=args.part, text_fields=args.text_fields,
                text_context=args.text_context)
    except (DataError, FileNotFoundError) as e:
        print(f"data2rec: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # reading the inputs: one line naming the file, not a traceback
        print(f"data2rec: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    if s is None:
        print(f"data2rec: part {args.part[0]}/{args.part[1]} done; other parts still have shards to "
              f"build (the run that completes the last one writes manifest.json)")
        return 0
    counts = f"rows in {s['rows_in']} = written {s['total_records']} + rejected {s['rejected']}"
    if s["total_records"] == 0:  # every row rejected: no data, whatever the shard files say
        print(f"data2rec: error: {counts}: nothing was written; "
              f"{os.path.join(args.output_dir, 'rejects.jsonl')} gives each row's reason", file=sys.stderr)
        return 1
    cut = ", ".join(f"{f} {n}" for f, n in s["text_cut"].items() if n)
    print(f"data2rec: {counts} ({len(s['shards'])} shards in {args.output_dir}; rejects.jsonl lists the rejected"
          f" rows; caption fallbacks {s['caption_fallbacks']}; texts cut at their field's context "
          f"({', '.join(f'{f} {w}' for f, w in s['text_context'].items())}): {cut or 'none'})")
    return 0

