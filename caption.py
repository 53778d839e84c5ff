"""Generate synthetic captions for images (ALIP step 2), resumable, over ranks and machines.

    python caption.py --manifest rows.jsonl --image-root imgs/ --output-dir caps/ \
        --model coca_ViT-L-14 --pretrained FILE
    python caption.py --wds 'tars/*.tar' --output-dir caps/ --backend hf \
        --model Salesforce/blip-image-captioning-large
    torchrun --nproc-per-node 8 caption.py --rec shards/ --output-dir caps/ --backend vllm \
        --model Qwen/Qwen2.5-VL-3B-Instruct --decoding greedy

Writes captions.jsonl (data2rec --captions), failed.jsonl, captions.json (captioner, settings,
counts) and, for a manifest, captioned.<ext> (data2rec --manifest). Rerun the same command to
complete an interrupted run. See alip/caption/ for the behaviour.
"""
import argparse
import os
import shlex
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(prog="caption.py", description=__doc__.split("\n")[0])
    src = p.add_argument_group("input (exactly one)")
    src.add_argument("--manifest", help="JSONL, CSV or TSV with an image path column (as data2rec reads it)")
    src.add_argument("--image-root", default=".", help="directory the manifest's image paths are relative to")
    src.add_argument("--image-col", default="image")
    src.add_argument("--text-col", default="text")
    src.add_argument("--caption-col", default="caption", help="column the captioned manifest copy fills")
    src.add_argument("--wds", help="glob of img2dataset-style tars (KEY.jpg + KEY.txt)")
    src.add_argument("--rec", help="a directory (or glob) of rec shards: caption the images already packed "
                                   "(captions.jsonl keyed by record key; data2rec.py --rec packs them back into shards)")
    m = p.add_argument_group("captioner")
    m.add_argument("--backend", default="open_clip", choices=["open_clip", "hf", "vllm", "clips"],
                   help="clips: --model is the model file of a train.py --method clips run")
    m.add_argument("--model", default="coca_ViT-L-14",
                   help="open_clip CoCa name | transformers/vLLM hub id or local directory")
    m.add_argument("--pretrained", default="",
                   help="open_clip backend: a weights file or an open_clip tag (needs network); required for a "
                        "built-in CoCa name (no random-init captions); local-dir:/hf-hub: models carry their own")
    m.add_argument("--trust-remote-code", action="store_true", help="hf/vllm: models with their own code (Florence-2)")
    m.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda:N")
    m.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    g = p.add_argument_group("generation (recorded; a rerun into the same --output-dir must use the same, "
                             "except those the --decoding does not use)")
    g.add_argument("--decoding", default="beam", choices=["greedy", "beam", "sample"])
    g.add_argument("--num-beams", type=int, default=3)
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 30; with --detailed %d" % DETAILED_MAX_NEW_TOKENS)
    g.add_argument("--min-new-tokens", type=int, default=5)
    g.add_argument("--temperature", type=float, default=1.0, help="--decoding sample")
    g.add_argument("--top-p", type=float, default=0.9, help="--decoding sample")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--prompt", default="", help="hf: text prefix / question; vllm: the user turn")
    g.add_argument("--detailed", action="store_true",
                   help=f"long, detailed descriptions (hf / vllm): --prompt {DETAILED_PROMPT!r} and "
                        f"--max-new-tokens {DETAILED_MAX_NEW_TOKENS} unless given; pack them with "
                        "data2rec.py --text-fields raw,caption:N")
    g.add_argument("--seed", type=int, default=0, help="--decoding sample: seeds each batch")
    o = p.add_argument_group("run")
    o.add_argument("--output-dir", required=True)
    o.add_argument("--batch-size", type=int, default=64)
    o.add_argument("--chunk-size", type=int, default=1000, help="rows per chunk file (the unit of resume)")
    o.add_argument("--workers", type=int, default=4, help="DataLoader processes reading and decoding images")
    o.add_argument("--part", default="0/1", metavar="I/N",
                   help="caption only chunks c with c %% N == I; a part is one machine's: give each machine "
                        "(each node of a multi-node torchrun) its own I, and its processes split the part by "
                        "LOCAL_RANK/LOCAL_WORLD_SIZE (without --part: by RANK/WORLD_SIZE over the whole launch)")
    o.add_argument("--tokenizer", default="ALIP-ViT-B-32",
                   help="open_clip model name whose tokenizer counts the captions too long for "
                        "--caption-context (data2rec.py --tokenizer)")
    o.add_argument("--caption-context", type=int, default=0, metavar="N",
                   help="count the captions longer than N tokens, which data2rec.py --text-fields caption:N "
                        "would cut (captions.json captions_cut); default: the --tokenizer's context")
    o.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.caption_context < 0:
        p.error(f"--caption-context {args.caption_context}: a number of tokens >= 1 (0: the --tokenizer's)")
    if args.detailed:
        if args.backend in ("open_clip", "clips"):
            p.error(f"--detailed: the {args.backend} backend captions without a prompt (use hf or vllm)")
        args.prompt = args.prompt or DETAILED_PROMPT
        args.max_new_tokens = args.max_new_tokens or DETAILED_MAX_NEW_TOKENS
    if args.max_new_tokens is None:
        args.max_new_tokens = 30
    from alip.data.pack import DataError, check_tokenizer
    try:
        check_tokenizer(args.tokenizer)
    except DataError as e:
        p.error(str(e))
    if sum(map(bool, (args.manifest, args.wds, args.rec))) != 1:
        p.error("give exactly one of --manifest, --wds or --rec")
    if args.batch_size < 1 or args.chunk_size < 1 or args.workers < 0:
        p.error("--batch-size and --chunk-size must be >= 1, --workers >= 0")
    from alip.cli import parse_part  # here: --help need not import torch
    try:
        args.part = parse_part(args.part)
    except ValueError as e:
        p.error(str(e))
    return args


DETAILED_PROMPT = "Describe this image in detail."
DETAILED_MAX_NEW_TOKENS = 200


def resolve_device(device, precision, local_rank):
    """(device, precision); a --device naming no device or a GPU that is not there is a
    ValueError in train.py's words (alip.cli)."""
    from alip.cli import resolve_device as resolve

    device = resolve(device, local_rank)
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return device, precision


def main(argv=None) -> int:
    from alip.caption import writer
    from alip.caption.backends import GenSettings, build_captioner, check_weights, one_line, plan_description
    from alip.caption.run import ASSEMBLING_ELSEWHERE, caption_dataset, make_plan, process_slot
    from alip.caption.sources import DataError, ManifestRows, RecRows, TarRows

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        slot, slots, who = process_slot(args.part)
        device, precision = resolve_device(args.device, args.precision,
                                           int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        print(f"caption: error: {e}", file=sys.stderr)
        return 2
    gen = GenSettings(args.decoding, args.num_beams, args.max_new_tokens, args.min_new_tokens, args.temperature,
                      args.top_p, args.repetition_penalty, args.prompt, args.seed)
    try:
        gen.check()
        check_weights(args.backend, args.model, args.pretrained)  # before any input is read
        if args.manifest:
            source = ManifestRows(args.manifest, args.image_root, args.image_col, args.text_col, args.caption_col)
        elif args.wds:
            source = TarRows(args.wds)
        else:
            source = RecRows(args.rec)
        # the output dir and the plan before the model (a vLLM load takes minutes), creating nothing:
        # plan.json and chunks/ are written once the model has loaded and taken the settings (its
        # --max-new-tokens limit), so a model that does not load leaves no output state behind
        plan = make_plan(source, plan_description(args.backend, args.model, args.pretrained, precision), gen,
                         args.batch_size, args.chunk_size)
        writer.check_output_dir(args.output_dir)
        writer.check_spare_inputs(args.output_dir, source)
        writer.check_plan(args.output_dir, plan, write=False)
        captioner = build_captioner(args.backend, args.model, args.pretrained, gen, device, precision,
                                    args.trust_remote_code)
        # again after the load: the weights as loaded (a hub load may have fetched a newer revision)
        plan = make_plan(source, plan_description(args.backend, args.model, args.pretrained, precision), gen,
                         args.batch_size, args.chunk_size)
        s = caption_dataset(source, captioner, gen, args.output_dir, batch_size=args.batch_size,
                            chunk_size=args.chunk_size, workers=args.workers, part=args.part, rank=slot,
                            world_size=slots, command=shlex.join(["caption.py", *argv]),
                            progress=not args.no_progress and slot == 0, plan=plan)
    except (DataError, ValueError, OSError) as e:  # bad input, missing files/models, unwritable output
        print(f"caption: error: {one_line(e)}", file=sys.stderr)
        return 1
    if s == ASSEMBLING_ELSEWHERE:
        print(f"caption: {who} done; every chunk is written and another process is assembling the outputs "
              f"({args.output_dir}/captions.json is written last)")
        return 0
    if s is None:
        print(f"caption: {who} done; other processes still have chunks to caption (the one that finds every "
              "chunk written assembles the output; rerun the same command once all are done if none did)")
        return 0
    try:
        s = writer.note_lengths(args.output_dir, s, args.tokenizer, args.caption_context)
    except (ValueError, OSError) as e:
        print(f"caption: error: --tokenizer {args.tokenizer}: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"caption: rows in {s['rows_in']} = captioned {s['captioned']} + failed {s['failed']} "
          f"({args.output_dir}/captions.jsonl; failed.jsonl lists the failed rows); "
          f"{s['captions_cut']} captions longer than {s['caption_context']} tokens (longest "
          f"{s['caption_tokens_max']}{'+' if s['captions_cut'] else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
