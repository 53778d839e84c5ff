"""Captioner backends, one interface: a batch of preprocessed images -> list of caption strings.

Each backend has
* ``preprocess(pil_image)``: runs in the DataLoader workers (picklable), returns one item;
* ``collate(items)``: the batch the model takes;
* ``__call__(batch) -> list[str]``: one raw caption per image (empty strings allowed; the
  pipeline counts those as failures);
* ``describe()``: what is recorded in the output (model, weights, precision).

``open_clip`` (CoCa, the default), ``hf`` (transformers image-to-text models), ``vllm`` (chat
VLMs; imported only when asked for).
"""
import os
from dataclasses import asdict, dataclass

import torch

from .weights import weights_identity

DECODINGS = ("greedy", "beam", "sample")


@dataclass(frozen=True)
class GenSettings:
    """Generation settings; every field changes the captions, so all are recorded and checked."""
    decoding: str = "beam"
    num_beams: int = 3
    max_new_tokens: int = 30
    min_new_tokens: int = 5
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    prompt: str = ""
    seed: int = 0

    def check(self):
        if self.decoding not in DECODINGS:
            raise ValueError(f"--decoding {self.decoding!r}: one of {DECODINGS}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens < self.max_new_tokens:
            raise ValueError(f"need --max-new-tokens >= 1 and 0 <= --min-new-tokens < --max-new-tokens "
                             f"(got {self.max_new_tokens}, {self.min_new_tokens})")
        if self.decoding == "beam" and self.num_beams < 1:
            raise ValueError(f"--num-beams {self.num_beams}: must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("need --temperature > 0, 0 < --top-p <= 1, --repetition-penalty > 0")
        return self

    def asdict(self):
        return asdict(self)


def _autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def one_line(e, limit=None):
    """An exception's message on one line (library messages run to many lines: caption.py's
    errors are one line each), cut at ``limit`` characters if given."""
    text = " ".join(str(e).split())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def check_weights_file(path, flag):
    """Refuse, in one line naming ``flag`` and the file, a weights file that cannot hold weights:
    a train.py training state (the eval CLIs' own check, ``alip.eval.load``), a missing path, a
    directory, an empty file. Flags and a stat only: runs before any input is read."""
    from alip.eval.load import refuse_training_state

    refuse_training_state(path, flag)
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: a directory, not a weights file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{flag} {path}: an empty file (0 bytes), not weights")


def _looks_like_a_file(pretrained):
    """An open_clip --pretrained that names a file rather than a tag (tags have no path separator
    and no weights suffix)."""
    return os.sep in pretrained or pretrained.endswith(WEIGHT_FILES + (".pt",)) or os.path.exists(pretrained)


def check_weights(backend, model, pretrained=""):
    """Every check of the weights flags that needs no model load (caption.py runs it before any
    input is read; ``build_captioner`` again): CoCa weights present, a weights file that can be
    one, a transformers model that is a directory or a hub id (not a file)."""
    if backend == "open_clip":
        check_coca_weights(model, pretrained)
        if pretrained and _looks_like_a_file(pretrained):
            check_weights_file(pretrained, "--pretrained")
    elif backend == "clips":
        check_weights_file(model, "--model")
    elif backend in ("hf", "vllm"):
        from alip.eval.load import refuse_training_state
        refuse_training_state(model, "--model")
        if os.path.isfile(model):
            raise ValueError(f"--model {model}: a file; --backend {backend} takes a model directory "
                             "(config, weights, processor) or a hub id")


def check_max_new_tokens(gen, limit, what):
    """Refuse a --max-new-tokens the model cannot generate (it failed at the first batch, after
    plan.json had locked the output dir to it, or was silently capped): ``what`` says whose limit."""
    if limit is not None and gen.max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens {gen.max_new_tokens}: {what} generates at most {limit} tokens; "
                         f"give --max-new-tokens {limit} or less")


# ----------------------------------------------------------------------------------------------
# open_clip CoCa

WEIGHT_FILES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir: model


def check_coca_weights(model, pretrained):
    """Refuse a CoCa that open_clip would build random-init (it writes junk captions and exits 0):
    a built-in name needs --pretrained; a ``local-dir:`` model needs a weights file in its dir; a
    ``local-dir:``/``hf-hub:`` model carries its weights, and open_clip ignores --pretrained for it.
    Checks flags and one directory listing only: runs before any input is read."""
    schema = next((s for s in ("local-dir:", "hf-hub:") if model.startswith(s)), None)
    if schema and pretrained:
        raise ValueError(f"--pretrained {pretrained}: open_clip ignores it for --model {model} (a {schema} model "
                         "carries its own weights); drop --pretrained")
    if schema == "local-dir:":
        d = model[len(schema):]
        if os.path.isdir(d) and not any(f.endswith(WEIGHT_FILES) for f in os.listdir(d)):
            raise ValueError(f"--model {model}: no weights file (*.safetensors, *.bin, *.pth) in {d}; without "
                             "one the CoCa is random-init and writes junk captions")
    elif schema is None and not pretrained:
        import open_clip
        tags = open_clip.list_pretrained_tags_by_model(model)
        hint = f" (open_clip's tags for it: {', '.join(tags)}; a tag downloads)" if tags else ""
        raise ValueError(f"--model {model} needs --pretrained, a weights file or an open_clip tag{hint}: "
                         "without it the CoCa is random-init and writes junk captions")


class CocaCaptioner:
    """open_clip CoCa (``coca_ViT-B-32``, ``coca_ViT-L-14`` or any CoCa config) via ``model.generate``."""

    name = "open_clip"

    def __init__(self, model, pretrained, gen, device="cpu", precision="fp32", random_init=False):
        import open_clip
        from open_clip import coca_model

        if not coca_model._has_transformers:
            raise ValueError("open_clip's CoCa.generate needs transformers <= 4.56 (it imports BeamSearchScorer; "
                             "requirements.txt pins transformers==4.56.2)")
        if gen.prompt:
            raise ValueError("--prompt: the open_clip CoCa backend captions without a prompt")
        if gen.decoding == "beam" and gen.num_beams < 2:
            raise ValueError("--decoding beam with open_clip CoCa needs --num-beams >= 2 (or --decoding greedy)")
        if not random_init:  # a benchmark times random-init models on purpose
            check_coca_weights(model, pretrained)
        self.model_name, self.pretrained, self.gen = model, pretrained, gen
        self.device, self.precision = torch.device(device), precision
        if model.startswith("hf-hub:"):  # open_clip only warns when the hub has no weights: random init
            from open_clip.pretrained import download_pretrained_from_hf
            try:
                download_pretrained_from_hf(model[len("hf-hub:"):])
            except Exception as e:
                raise ValueError(f"--model {model}: no weights from the hub ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:300]})") from None
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=self.device)
        self.weights = weights_identity(self.name, model, pretrained)
        if not hasattr(self.model, "generate") or not hasattr(self.model, "text_decoder"):
            raise ValueError(f"--model {model} is not a CoCa model (no text decoder to caption with)")
        check_max_new_tokens(gen, self.token_limit(), f"the CoCa {model} (its text context)")
        self.model.eval()
        self._decode = open_clip.decode

    def token_limit(self):
        """New tokens ``generate`` can make: the growing text (start token + new tokens but the
        last) passes through the text tower (plus its CLS token) and the multimodal decoder, each
        ``context_length`` long (76 for open_clip's CoCas; 77 failed with a tensor-size error)."""
        return min(self.model.text.context_length, self.model.text_decoder.context_length)

    def describe(self):
        return {"backend": self.name, "model": self.model_name, "pretrained": self.pretrained,
                "precision": self.precision, "weights": self.weights}

    def collate(self, items):
        return torch.stack(items)

    def _generate_kwargs(self):
        g = self.gen
        kw = dict(seq_len=g.max_new_tokens + 1, min_seq_len=g.min_new_tokens + 1,  # +1: the start token
                  repetition_penalty=g.repetition_penalty, temperature=g.temperature)
        if g.decoding == "beam":
            return dict(kw, generation_type="beam_search", num_beams=g.num_beams, num_beam_groups=1)
        if g.decoding == "greedy":  # top-1 filtering: the sampled token is the argmax
            return dict(kw, generation_type="top_k", top_k=1)
        return dict(kw, generation_type="top_p", top_p=g.top_p)

    @torch.no_grad()
    def __call__(self, images):
        images = images.to(self.device, non_blocking=True)
        with _autocast(self.device, self.precision):
            tokens = self.model.generate(images, **self._generate_kwargs())
        return [self._decode(t).split("<end_of_text>")[0].replace("<start_of_text>", "") for t in tokens]


# ----------------------------------------------------------------------------------------------
# transformers image-to-text models

def _load_hf_model(name, dtype, trust_remote_code):
    import transformers

    errors = []
    for cls in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        auto = getattr(transformers, cls, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:  # "Unrecognized configuration class ..." for this auto class
            errors.append(f"{cls}: {str(e).splitlines()[0]}")
    raise ValueError(f"--model {name}: no image-to-text model class fits it ({'; '.join(errors)})")


class _HFImages:
    """Picklable per-image preprocessing with the model's image processor."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, img):
        return self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]


class HFCaptioner:
    """A transformers image-to-text model (BLIP, BLIP-2, GIT, Florence-2, VisionEncoderDecoder...).

    Local directory or hub id; ``AutoProcessor`` (else image processor + tokenizer); batched
    ``generate(pixel_values, [input_ids of --prompt])``; bf16 on GPU by default. The output is
    decoded whole, as the model cards do: text-prefix captioners (BLIP, GIT) start the caption with
    the prompt, encoder-decoders (Florence-2 with ``--prompt "<CAPTION>"``, VisionEncoderDecoder)
    return only new text. Chat VLMs need their chat template and image tokens: use ``vllm``.
    """

    name = "hf"

    def __init__(self, model, gen, device="cpu", precision="fp32", trust_remote_code=False):
        import transformers

        self.model_name, self.gen = model, gen
        self.device, self.precision = torch.device(device), precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError):
            self.processor = None
        remote = dict(trust_remote_code=trust_remote_code)
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None:
            image_processor = transformers.AutoImageProcessor.from_pretrained(model, **remote)
        tokenizer = getattr(self.processor, "tokenizer", None)
        self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(model, **remote)
        self.model = _load_hf_model(model, dtype, trust_remote_code).to(self.device).eval()
        self.weights = weights_identity(self.name, model)
        self.preprocess = _HFImages(image_processor)
        self.dtype = dtype
        check_max_new_tokens(gen, self.token_limit(), f"{model} (its text positions, less the prompt's tokens)")

    def token_limit(self):
        """New tokens the text decoder has positions for: its ``max_position_embeddings`` less the
        tokens it starts from (the tokenized --prompt, else one start token), + 1 (the last new
        token is never fed back). The tiny BLIP (64 positions) failed with an IndexError at 65 new
        tokens. BLIP drops the prompt's [SEP], so there this is one under the true limit. None
        when the config names no such limit."""
        config = self.model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        positions = getattr(text, "max_position_embeddings", None)
        if not isinstance(positions, int):
            return None
        start = len(self.tokenizer(self.gen.prompt)["input_ids"]) if self.gen.prompt else 1
        return positions - start + 1

    def describe(self):
        return {"backend": self.name, "model": self.model_name, "model_class": type(self.model).__name__,
                "precision": self.precision, "weights": self.weights}

    def collate(self, items):
        return torch.stack(items)

    def _prompt_ids(self, n):
        if not self.gen.prompt:
            return None
        ids = self.tokenizer([self.gen.prompt] * n, return_tensors="pt", add_special_tokens=True)
        return {k: v.to(self.device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}

    def _generate_kwargs(self):
        g = self.gen
        kw = dict(max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens,
                  repetition_penalty=g.repetition_penalty)
        if g.decoding == "beam":
            return dict(kw, do_sample=False, num_beams=g.num_beams)
        if g.decoding == "greedy":
            return dict(kw, do_sample=False, num_beams=1)
        return dict(kw, do_sample=True, temperature=g.temperature, top_p=g.top_p, num_beams=1)

    @torch.no_grad()
    def __call__(self, pixel_values):
        pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
        prompt = self._prompt_ids(len(pixel_values))
        out = self.model.generate(pixel_values=pixel_values, **(prompt or {}), **self._generate_kwargs())
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# vLLM (chat VLMs: Qwen2-VL / Qwen2.5-VL, LLaVA, ...)

DEFAULT_VLM_PROMPT = "Describe this image in one sentence."


def _identity(img):
    return img


class VLLMCaptioner:
    """A chat VLM served in-process by vLLM (optional dependency, imported here only).

    Each image becomes one chat turn ``[image, prompt]`` through the model's own chat template
    (``LLM.chat``), so the prompt is model-agnostic. Greedy or sampling (vLLM's beam search is a
    separate API and not wired in).
    """

    name = "vllm"

    def __init__(self, model, gen, precision="bf16", max_model_len=4096, gpu_memory_utilization=0.9,
                 trust_remote_code=False):
        if gen.decoding == "beam":
            raise ValueError("--backend vllm: use --decoding greedy or sample (beam search is not wired in)")
        # vLLM refuses each request whose prompt + max_tokens pass max_model_len (at the first batch)
        check_max_new_tokens(gen, max_model_len - 1, f"vLLM with max_model_len {max_model_len} (prompt and "
                             "image tokens included)")
        try:
            import vllm
        except ImportError:
            raise ValueError("--backend vllm needs vLLM (`pip install vllm`, a CUDA machine); "
                             "it is an optional extra, not installed here") from None
        self.model_name, self.gen, self.precision = model, gen, precision
        self.prompt = gen.prompt or DEFAULT_VLM_PROMPT
        self.llm = vllm.LLM(model=model, dtype={"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32"),
                            max_model_len=max_model_len, limit_mm_per_prompt={"image": 1},
                            gpu_memory_utilization=gpu_memory_utilization, seed=gen.seed,
                            trust_remote_code=trust_remote_code)
        self.weights = weights_identity(self.name, model)
        g = gen
        self.sampling = vllm.SamplingParams(
            max_tokens=g.max_new_tokens, min_tokens=g.min_new_tokens, repetition_penalty=g.repetition_penalty,
            temperature=0.0 if g.decoding == "greedy" else g.temperature,
            top_p=1.0 if g.decoding == "greedy" else g.top_p, seed=g.seed)
        self.preprocess = _identity

    def describe(self):
        import vllm
        return {"backend": self.name, "model": self.model_name, "precision": self.precision,
                "prompt_used": self.prompt, "vllm_version": vllm.__version__, "weights": self.weights}

    def collate(self, items):
        return list(items)

    def __call__(self, images):
        conversations = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": img},
                                                       {"type": "text", "text": self.prompt}]}]
                         for img in images]
        outs = self.llm.chat(conversations, self.sampling, use_tqdm=False)
        return [o.outputs[0].text for o in outs]


class CLIPSCaptioner:
    """A CLIPS model trained here (``train.py --method clips``): its caption decoder over the
    image's patch tokens (image only: web text is not part of this interface), greedy or beam."""

    name = "clips"

    def __init__(self, checkpoint, gen, device="cpu", precision="fp32"):
        import open_clip

        from alip.eval.load import load_model, read_checkpoint
        from alip.methods.clips import decoder_from_eval_heads

        check_weights_file(checkpoint, "--model")
        saved = read_checkpoint(checkpoint, "--model")  # the eval CLIs' reader: one line if unreadable
        heads = saved.get("eval_heads", {}) if isinstance(saved, dict) else {}
        if not isinstance(saved, dict) or saved.get("method") != "clips" or "decoder" not in heads:
            raise ValueError(f"--model {checkpoint}: not a CLIPS checkpoint of train.py (--backend "
                             f"clips needs the model file of a --method clips run)")
        if gen.decoding == "sample" or gen.prompt:
            raise ValueError("--backend clips: greedy or beam decoding, no prompt")
        self.checkpoint, self.gen = checkpoint, gen
        self.device, self.precision = torch.device(device), precision
        # the eval CLIs' loader: the model at the context its file records (--text-context)
        self.model, self.preprocess, _ = load_model(checkpoint=checkpoint, device=self.device)
        self.decoder = decoder_from_eval_heads(heads).to(self.device)
        self.weights = weights_identity(self.name, checkpoint)
        check_max_new_tokens(gen, self.token_limit(), f"the CLIPS decoder of {checkpoint} (its "
                             f"{self.decoder.num_queries} queries, a {self.model.context_length}-"
                             f"token context)")
        self._decode = open_clip.decode

    def token_limit(self):
        """The decoder writes one token per query, and its rows hold the model's context with
        start and end: more than this was silently cut (plan.json recorded the setting, not what
        was applied)."""
        return min(self.decoder.num_queries, self.model.context_length - 2)

    def describe(self):
        return {"backend": self.name, "model": self.checkpoint, "pretrained": None,
                "precision": self.precision, "weights": self.weights}

    def collate(self, items):
        return torch.stack(items)

    @torch.no_grad()
    def __call__(self, images):
        from alip.methods.filip import dense_image_tokens
        images = images.to(self.device, non_blocking=True)
        beams = self.gen.num_beams if self.gen.decoding == "beam" else 1
        with _autocast(self.device, self.precision):
            tokens = dense_image_tokens(self.model, images, ln_post=True)[0]
            rows = self.decoder.generate(tokens, None, num_beams=beams,
                                         context_length=self.gen.max_new_tokens + 2)
        return [self._decode(r).split("<end_of_text>")[0].replace("<start_of_text>", "").strip()
                for r in rows]


BACKENDS = ("open_clip", "hf", "vllm", "clips")


def output_generation(backend, gen):
    """The generation settings as plan.json records them: those that cannot change this backend's
    captions are None, so changing them does not lock an output dir. greedy: no beams, temperature
    or top-p (and no seed, except open_clip, whose greedy is top-1 sampling: the seed picks among
    tied logits); beam: no temperature, top-p or seed (deterministic); sample: no beams. Any other
    backend (library use): every setting."""
    g = gen.asdict()
    if backend not in BACKENDS:
        return g
    unused = set()
    if gen.decoding != "beam":
        unused.add("num_beams")
    if gen.decoding != "sample":
        unused |= {"temperature", "top_p"}
    if gen.decoding == "beam" or (gen.decoding == "greedy" and backend != "open_clip"):
        unused.add("seed")
    return {k: None if k in unused else v for k, v in g.items()}


def plan_description(backend, model, pretrained="", precision="fp32"):
    """The captioner as plan.json records it, from the flags alone (the model is not loaded yet;
    captions.json records the loaded captioner's ``describe()``)."""
    desc = {"backend": backend, "model": model}
    if backend == "open_clip":
        desc["pretrained"] = pretrained
    return dict(desc, precision=precision, weights=weights_identity(backend, model, pretrained))


def _model_flags(backend, model, pretrained):
    return f"--model {model}" + (f" --pretrained {pretrained}" if backend == "open_clip" and pretrained else "")


def build_captioner(backend, model, pretrained, gen, device="cpu", precision="fp32", trust_remote_code=False,
                    random_init=False):
    """The captioner of ``backend``; ``random_init=True`` lets a CoCa without weights through (only
    for timing: it writes junk captions). A model that does not load (bad or mismatched weights,
    a corrupt file, a missing hub id) is one ValueError naming the flags, whatever the library
    raised (torch.load's unpickling errors and open_clip's size mismatches were tracebacks)."""
    gen.check()
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: one of {BACKENDS}")
    if not random_init:
        check_weights(backend, model, pretrained)
    try:
        return _build(backend, model, pretrained, gen, device, precision, trust_remote_code, random_init)
    except ValueError as e:  # our own refusals (one line already), or a library's
        raise ValueError(one_line(e, 600)) from e
    except Exception as e:
        raise ValueError(f"{_model_flags(backend, model, pretrained)}: the {backend} captioner does not load "
                         f"({type(e).__name__}: {one_line(e, 300)})") from e


def _build(backend, model, pretrained, gen, device, precision, trust_remote_code, random_init):
    if backend == "open_clip":
        return CocaCaptioner(model, pretrained, gen, device, precision, random_init)
    if pretrained:
        raise ValueError(f"--pretrained is for the open_clip backend; --backend {backend} takes weights via --model")
    if backend == "hf":
        return HFCaptioner(model, gen, device, precision, trust_remote_code)
    if backend == "vllm":
        return VLLMCaptioner(model, gen, precision, trust_remote_code=trust_remote_code)
    return CLIPSCaptioner(model, gen, device, precision)
