"""Fine-tuning controls: freezing, per-parameter learning rates and weight decay.

The ``finetune:`` section of a training config (config.FinetuneSection) maps
to what this module does to the model and the optimizer's parameter groups,
before DeepSpeed wraps them (so it works with ZeRO 0-3 and SPIM alike: they
only see which parameters train and the groups' ``lr`` / ``weight_decay``):

* ``freeze_encoder: true`` freezes the whole encoder, ``freeze_layers: k`` its
  first k "layers": layer 0 is everything before the first block (patch embedding,
  position tables, class token), layers 1..L the blocks. Without
  ``unfreeze_step`` frozen parameters get ``requires_grad=False`` (no gradient,
  no optimizer state). With ``unfreeze_step: N`` they keep their gradients but
  their groups' learning rate is 0 for the first N steps (exactly unchanged:
  AdamW's decoupled decay is also scaled by lr) and follow the schedule after.
* ``encoder_lr``: the encoder's base lr (default ``optimizer.lr``).
* ``layer_decay`` (ViT encoders): lr of layer i = base x decay^(L + 1 - i)
  (BEiT / MAE fine-tuning), so the last block trains at ``base x decay``,
  the patch embedding at ``base x decay^(L+1)``; layers after the blocks
  (final norm, SAM neck) and the decoder at full lr.
* ``lora``: ``peft`` LoRA adapters on the encoder's attention projections;
  the encoder's own weights freeze, the adapters and the decoder train; an
  export merges the adapters into plain weights (:func:`merge_lora`).
* No weight decay on norms, biases (every parameter of rank < 2) and position
  tables / special tokens (names in :data:`NO_DECAY_NAMES`).

Each group carries ``lr_scale`` (its lr over ``optimizer.lr``),
``decay`` (whether ``optimizer.weight_decay`` applies) and ``start_step``, so
the schedule and a resume with changed hyper-parameters (engine.py) can
rebuild every group's lr.
"""
from __future__ import annotations

from torch import nn

from ..config_schema import ConfigError

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "rel_pos_h", "rel_pos_w",
                  "position_embedding", "absolute_pos_embed", "relative_position_bias_table", "dist_token")


def encoder_blocks(encoder: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(dotted name, blocks)`` of a ViT-like encoder's block list (timm ViT /
    samvit ``model.blocks``, transformers SAM ``sam.layers``, Prithvi ``blocks``),
    or None for encoders without one (CNNs)."""
    for name in ("model.blocks", "sam.layers", "blocks"):
        m = encoder
        for part in name.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m):
            return name, m
    return None


def encoder_layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name: layer id}, L)``: 0 before the first block, 1..L the
    blocks, L + 1 after them (names relative to the encoder)."""
    found = encoder_blocks(encoder)
    if found is None:
        raise ValueError(f"{type(encoder).__name__} has no block list")
    prefix, blocks = found
    L = len(blocks)
    ids = {}
    seen_blocks = False
    for name, _ in encoder.named_parameters():
        if name.startswith(prefix + "."):
            ids[name] = int(name[len(prefix) + 1:].split(".")[0]) + 1
            seen_blocks = True
        else:
            ids[name] = L + 1 if seen_blocks else 0
    return ids, L


def no_weight_decay(name: str, p) -> bool:
    """Norm weights, biases (rank < 2) and position tables / special tokens."""
    return p.ndim < 2 or any(part in NO_DECAY_NAMES for part in name.split("."))


def apply_freezing(model: nn.Module, cfg, where: str | None = None) -> set[str]:
    """Names of the frozen parameters (config module docstring); without an
    ``unfreeze_step`` they get ``requires_grad=False`` here."""
    f = cfg.finetune
    if not f.freeze_encoder and not f.freeze_layers:
        return set()
    enc = model.encoder
    if f.freeze_encoder:
        names = {n for n, _ in enc.named_parameters()}
    else:
        try:
            ids, L = encoder_layer_ids(enc)
        except ValueError as e:
            raise ConfigError(where, "finetune.freeze_layers",
                              f"needs a ViT encoder with blocks ({e}); use finetune.freeze_encoder") from None
        if f.freeze_layers > L + 1:
            raise ConfigError(where, "finetune.freeze_layers",
                              f"{f.freeze_layers} layers, but the encoder has {L + 1} (embedding + {L} blocks)")
        names = {n for n, i in ids.items() if i < f.freeze_layers}
    if f.unfreeze_step is None:
        for n, p in enc.named_parameters():
            if n in names:
                p.requires_grad_(False)
    return {f"encoder.{n}" for n in names}


def lora_targets(encoder: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Dotted names (in the encoder) of the ``nn.Linear`` modules that get LoRA
    adapters: those ending with one of ``targets`` (default: the attention
    projections ``attn.qkv`` and ``attn.proj`` of timm / Prithvi / SAM blocks)."""
    ends = tuple(targets) if targets else ("attn.qkv", "attn.proj")
    return [n for n, m in encoder.named_modules()
            if isinstance(m, nn.Linear) and (n in ends or n.endswith(tuple("." + e for e in ends)))]


def apply_lora(model: nn.Module, cfg, where: str | None = None) -> set[str]:
    """Inject ``peft`` LoRA adapters into the encoder (``finetune.lora``); the
    encoder's own weights are frozen (``requires_grad=False``), the adapters and
    everything outside the encoder train. Returns the frozen parameter names."""
    lc = cfg.finetune.lora
    if lc is None:
        return set()
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ConfigError(where, "finetune.lora", f"needs the 'peft' package ({e})") from None
    names = lora_targets(model.encoder, lc.targets)
    if not names:
        raise ConfigError(where, "finetune.lora.targets",
                          f"no nn.Linear of the encoder ({type(model.encoder).__name__}) ends with "
                          f"{lc.targets or ['attn.qkv', 'attn.proj']}")
    conf = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=names, bias="none")
    inject_adapter_in_model(conf, model.encoder)  # also marks only the adapters of the encoder trainable
    return {f"encoder.{n}" for n, p in model.encoder.named_parameters() if not p.requires_grad}


def merge_lora(state_dict: dict, r: int, alpha: float) -> dict:
    """A state dict with every LoRA-adapted linear merged back into a plain one:
    ``W = W0 + (alpha / r) B A`` under the original key (``X.weight``, ``X.bias``),
    adapter keys removed (peft's layout: ``X.base_layer.*``, ``X.lora_A.<adapter>.weight``,
    ``X.lora_B.<adapter>.weight``). Plain state dicts come back unchanged."""
    out: dict = {}
    scale = alpha / r
    for k, v in state_dict.items():
        if ".lora_A." in k or ".lora_B." in k or ".lora_dropout." in k:
            continue
        if ".base_layer." in k:
            prefix, leaf = k.split(".base_layer.")
            if leaf == "weight":
                a = [x for x in state_dict if x.startswith(prefix + ".lora_A.")]
                b = [x for x in state_dict if x.startswith(prefix + ".lora_B.")]
                if len(a) != 1 or len(b) != 1:
                    raise ValueError(f"{prefix}: expected one LoRA adapter, found {len(a)} A / {len(b)} B")
                A, B = state_dict[a[0]].double(), state_dict[b[0]].double()
                v = (v.double() + scale * (B @ A)).to(v.dtype)
            out[f"{prefix}.{leaf}"] = v
        else:
            out[k] = v
    return out


def param_groups(model: nn.Module, cfg, frozen: set[str] = frozenset(), where: str | None = None) -> list[dict]:
    """The optimizer's parameter groups (module docstring) of the trainable parameters."""
    f, o = cfg.finetune, cfg.optimizer
    enc_scale = (f.encoder_lr / o.lr) if f.encoder_lr is not None else 1.0
    ids, L = {}, 0
    if f.layer_decay is not None:
        try:
            ids, L = encoder_layer_ids(model.encoder)
        except ValueError as e:
            raise ConfigError(where, "finetune.layer_decay", f"needs a ViT encoder with blocks ({e})") from None
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if name.startswith("encoder."):
            scale = enc_scale
            if f.layer_decay is not None:
                lid = ids[name[len("encoder."):]]
                scale *= f.layer_decay ** (L + 1 - lid) if lid <= L else 1.0
        decay = o.weight_decay > 0 and not no_weight_decay(name, p)
        start = f.unfreeze_step if (name in frozen and f.unfreeze_step) else 0
        key = (scale, decay, start)
        g = groups.setdefault(key, {"params": [], "lr": o.lr * scale, "lr_scale": scale,
                                    "weight_decay": o.weight_decay if decay else 0.0, "decay": decay,
                                    "start_step": start})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[2], -k[0], not k[1]))]


def describe(model: nn.Module, groups: list[dict], frozen: set[str]) -> str:
    """One line: trainable / frozen parameter counts and the groups."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for g in groups for p in g["params"] if g["start_step"] == 0)
    held = sum(p.numel() for n, p in model.named_parameters() if n in frozen)
    parts = [f"{len(g['params'])} tensors lr x{g['lr_scale']:.3g}{'' if g['decay'] else ' no-wd'}"
             f"{' from step ' + str(g['start_step']) if g['start_step'] else ''}" for g in groups]
    return (f"finetune: {train:,} of {total:,} parameters train, {held:,} frozen; "
            f"{len(groups)} groups: {', '.join(parts)}")


__all__ = ["NO_DECAY_NAMES", "encoder_blocks", "encoder_layer_ids", "no_weight_decay", "apply_freezing",
           "lora_targets", "apply_lora", "merge_lora", "param_groups", "describe"]
