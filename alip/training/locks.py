"""open_clip_train's tower locks (``--lock-image`` / ``--lock-text``, LiT) on the created model,
with one-line errors where open_clip asserts or locks nothing."""
from alip.cli import one_line
from alip.methods.base import weights_given

from .config import TrainConfigError


def lock_towers(model, args, log):
    """open_clip_train's ``--lock-image`` / ``--lock-text`` (LiT), through the open_clip model's
    own ``lock_image_tower`` / ``lock_text_tower``. Called where open_clip_train calls them: on
    the created model (with its --pretrained weights), before grad checkpointing, the method,
    the optimizer and DDP, so a locked parameter is in neither the optimizer nor DDP's reducer.
    A tower without a lock method, a lock the tower refuses (open_clip's asserts), or one that
    locks nothing is a TrainConfigError naming the flag."""
    if args.lock_image:
        _lock(model, args, log, "--lock-image", "image", getattr(model, "visual", None),
              "lock_image_tower", "--lock-image-unlocked-groups", args.lock_image_unlocked_groups,
              unlocked_groups=args.lock_image_unlocked_groups,
              freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
        # CustomTextCLIP keeps its text tower in .text (its lock_text_tower calls text.lock);
        # CLIP unpacks it onto the model and locks it with open_clip's lock_text_tower function
        custom = hasattr(model, "text")
        _lock(model, args, log, "--lock-text", "text", model.text if custom else
              getattr(model, "transformer", None), "lock_text_tower",
              "--lock-text-unlocked-layers", args.lock_text_unlocked_layers, tower_lock=custom,
              unlocked_layers=args.lock_text_unlocked_layers,
              freeze_layer_norm=args.lock_text_freeze_layer_norm)
    if (args.lock_image or args.lock_text) and not weights_given(args):
        log.warning("%s without --pretrained: the locked parameters keep their random "
                    "initialisation", " and ".join(
                        f for f, on in (("--lock-image", args.lock_image),
                                        ("--lock-text", args.lock_text)) if on))


def _lock(model, args, log, flag, what, tower, method, n_flag, n, tower_lock=True, **kwargs):
    kind = type(tower).__name__
    where = f"--model {args.model}'s {what} tower ({kind})"
    if not callable(getattr(model, method, None)) or (
            tower_lock and not callable(getattr(tower, "lock", None))):
        raise TrainConfigError(f"{flag}: {where} has no lock method; train it unlocked or pick "
                               f"another --model")
    before = {name for name, p in model.named_parameters() if p.requires_grad}
    try:
        getattr(model, method)(**kwargs)
    except (AssertionError, RuntimeError, ValueError, NotImplementedError, IndexError,
            KeyError) as e:  # open_clip's asserts; an HF arch without the layer names it needs
        why = f"KeyError {e}" if isinstance(e, KeyError) else one_line(e)
        if what == "text" and not kwargs["freeze_layer_norm"] and "LayerNorm" in str(e):
            raise TrainConfigError(
                f"{flag}: {where} locks its LayerNorms with the other weights and cannot leave "
                f"them trainable (open_clip: {why}); add --lock-text-freeze-layer-norm") from e
        raise TrainConfigError(f"{flag}{f' {n_flag} {n}' if n else ''}: {where} refuses: "
                               f"{why}") from e
    after = {name for name, p in model.named_parameters() if p.requires_grad}
    if not before - after:
        raise TrainConfigError(f"{flag} {n_flag} {n}: locks nothing: {where} has no more than "
                               f"{n} groups, all left unlocked; give a smaller {n_flag}")
    log.info(
        "%s: %d parameter tensors locked, %d stay trainable", flag, len(before - after),
        len(after))
