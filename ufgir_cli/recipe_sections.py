"""The sections of a recipe, one typed, frozen model each: data, model, optim, schedule, train, eval,
logging, sweep, and the constants they are checked against.

The model section also fills in what its backbone decides (depth-derived positions, numerics) where
its name tells it; the whole recipe, its sources and their resolution are :mod:`.recipe`. No torch.
"""

from __future__ import annotations

import contextvars
import re
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, RecipeNotice
from .geometry import (
    NUMERIC_KEYS,
    backbone_depth,
    backbone_numerics,
    backbone_patch,
    check_geometry,
    separate_qkv,
)
from .methods import MethodSpec, backbone_refusal, method_spec

#: ``train.precision`` values (and `ufgir eval --precision`'s).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

SPLITS = ("train", "val", "train_val", "test")
Split = Literal["train", "val", "train_val", "test"]
#: What ``data.augment = "medium"`` brings where unset (the reference's medaugs; `Recipe._augment_preset`).
MEDIUM_PRESET = {"optim": {"label_smoothing": 0.1},
                 "model": {"drop": 0.0, "drop_path": 0.1, "drop_path_schedule": "uniform"}}


#: Keys whose value depends on the machine a run starts on, not on what it trains (run keys and
#: `compare` leave them out).
MACHINE_KEYS = ("data.num_workers", "train.threads", "train.device")


def splits_share_images(a: str, b: str) -> bool:
    """Whether splits ``a`` and ``b`` hold common images: the same split, or train_val and one of its
    parts (train, val). A model evaluated on a split that shares images with its training split is
    not measured on held-out images."""
    return a == b or ("train_val" in (a, b) and {a, b} <= {"train", "val", "train_val"})


#: Reading a run's own recipe: it was resolved when the run started, and an unset ``model.depth`` there
#: means the backbone's own depth (runs made before methods derived it), so nothing is derived again.
SAVED_RECIPE: contextvars.ContextVar[bool] = contextvars.ContextVar("ufgir_saved_recipe", default=False)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _model_errors(e: ValidationError) -> str:
    """A model section's validation errors in one line, each named by its recipe key."""
    parts = []
    for err in e.errors():
        key = ".".join(str(x) for x in ("model", *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(msg if "model." in msg or not err["loc"] else f"recipe key {key!r}: {msg}")
    return "; ".join(parts)


class DataConfig(Section):
    dataset: str = Field("soyageing", description="Dataset name (see `ufgir datasets`) or `synthetic`.")
    root: str | None = Field(None, description="Folder that holds the dataset (default: the data dir).")
    num_workers: int | None = Field(
        None, ge=0, description="Data-loader worker processes; unset: from the cores at run time (half, at most 4).")
    resize_ratio: float | None = Field(
        None, ge=1.0, le=4.0, description="Resize side R = int(ratio * image_size), then the crop; 1.0 resizes "
        "to the crop. Unset: from model.numerics (1 / the backbone's crop_pct, or the reference's 1.34).")
    hflip: bool = Field(True, description="Random horizontal flip in training.")
    interpolation: Literal["bicubic", "bilinear"] | None = Field(
        None, description="Image resize interpolation. Unset: from model.numerics.")
    skip_corrupt: bool = Field(False, description="Skip unreadable images instead of stopping.")
    augment: Literal["weak", "medium"] = Field(
        "weak", description="weak: crop + flip; medium: + TrivialAugmentWide, RandomErasing, label smoothing 0.1 "
        "and uniform stochastic depth 0.1 instead of dropout (the reference's medaugs)")


def _fill_layout(spec: MethodSpec, data: dict, backbone_depth: int | None, *, derive_depth: bool = True) -> dict:
    """``data`` (a model section as a dict) with the method's depth-derived keys filled in where unset,
    for a backbone of ``backbone_depth`` blocks (None: unknown, those keys stay unset)."""
    if not spec.has_ila:
        given = [k for k in ("ila_ds_locs", "ila_locs") if data.get(k)]
        if given:
            warnings.warn(RecipeNotice(
                f"{' and '.join(f'model.{k} {list(data[k])}' for k in given)} dropped: method {spec.name!r} has no ILA"),
                stacklevel=2)
        data["ila_ds_locs"] = data["ila_locs"] = ()
    if spec.replaces_blocks and data.get("depth") is None and backbone_depth is not None:
        # A run saved before methods derived it ran every block: its unset depth is the backbone's.
        data["depth"] = backbone_depth - (spec.replaces_blocks if derive_depth else 0)
    depth = data.get("depth") or backbone_depth
    if depth is None or not isinstance(depth, int):  # unknown, or malformed (reported by field validation)
        return data
    if data.get("token_reduction") and data.get("reduction_locs") is None:
        data["reduction_locs"] = default_reduction_locs(depth)
    if data.get("ila_ds_locs") is None:
        data["ila_ds_locs"] = spec.ds_locs_for(depth)
    if data.get("ila_locs") is None:
        raw = data["ila_ds_locs"]
        ok = isinstance(raw, list | tuple) and all(isinstance(i, int) for i in raw)
        data["ila_locs"] = spec.default_ila_locs(depth, tuple(raw) if ok else ())
    return data


def default_reduction_locs(depth: int) -> tuple[int, ...]:
    """Where a token reduction goes on a ``depth``-block backbone when ``model.reduction_locs`` is unset:
    inside blocks floor(i * depth / 4), i = 1, 2, 3 (CLCA's 3, 6, 9 of 12)."""
    return tuple(sorted({i * depth // 4 for i in (1, 2, 3)}))


#: The modules a LoRA adapts unless ``model.lora_targets`` names others: attention's input projections, the
#: one fused ``qkv`` of each block, or, where the backbone keeps them apart, the query and value ones (the
#: LoRA paper's W_q and W_v).
LORA_TARGETS = {"fused": r"blocks\.\d+\.attn\.qkv", "separate": r"blocks\.\d+\.attn\.(q|v)_proj"}
#: The LoRA family's keys (methods whose row has a ``lora_rank``).
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_use_rslora", "lora_init_weights", "lora_targets")


def fill_numerics(data: dict, section: str, backbone: str, numerics: Any) -> dict:
    """``data`` (the ``section`` of a recipe, as a dict) with its unset numeric keys filled from
    ``model.numerics`` for ``backbone``; keys the name does not tell stay unset (read at build)."""
    if numerics not in ("backbone", "reference"):  # malformed: reported by field validation
        return data
    values, _ = backbone_numerics(backbone, numerics)
    for key in NUMERIC_KEYS[section]:
        if data.get(key) is None and key in values:
            data[key] = values[key]
    return data


class ModelConfig(Section):
    backbone: str = Field("vit_base_patch16_224.orig_in21k", description="A timm ViT name.")
    weights: str = Field("timm", description='"timm" (pretrained), "none" (random) or a weights file.')
    image_size: int = Field(224, ge=16, le=4096, description="Side of the square crop the model sees, in pixels "
                            "(the position embedding is resampled to it).")
    num_classes: int | None = Field(None, ge=2, description="Taken from the dataset when unset.")
    method: str = Field("ila_pp", description="A method of the table (`ufgir recipes list`) or of an installed plugin.")
    train_backbone: bool = Field(False, description="Every backbone weight trains too, whatever the method.")
    depth: int | None = Field(None, ge=1, description="Blocks of the backbone; None keeps the timm model's.")
    # Parallel adapters (adapter, convpass, ila_pp).
    adapter_dim: int = Field(8, ge=1, description="Parallel adapters' bottleneck width.")
    adapter_scale: float = Field(1.0, description="Factor on the parallel adapters' output.")
    adapter_kernel: int = Field(3, ge=1, description="ConvPass kernel size (odd).")
    adapter_init: Literal["xavier", "zero"] = Field(
        "xavier", description="Up-projection init: xavier (the reference) or zero (adapters start as identity)."
    )
    # Inter-layer adapters. None means "the method's default" and is resolved on load.
    ila_dim: int = Field(8, ge=1, description="ILA bottleneck width r.")
    ila_locs: tuple[int, ...] | None = Field(None, description="Blocks followed by a same-resolution ILA.")
    ila_ds_locs: tuple[int, ...] | None = Field(None, description="Blocks followed by a down-sampling ILA.")
    ila_kernel: int = Field(3, ge=1, description="ILA depthwise kernel (odd).")
    ila_norm: Literal["bn", "ln", "none"] = Field("bn", description="Normalisation inside ILA: BatchNorm, LayerNorm or none.")
    ila_cls_conv: bool = Field(True, description="CLS/prefix tokens get their own 1x1 conv in ILA.")
    ila_residual_init: Literal["near_ones", "ones", "xavier"] = Field(
        "near_ones", description="Init of a down-sampling ILA's residual convolution: N(1, 0.001) (the reference), "
        "ones, or Xavier-uniform.")
    ila_dws_mult: int = Field(1, ge=1, description="Depthwise channel multiplier inside ILA.")
    # Prompts (vpt_shallow, vpt_deep).
    prompt_len: int = Field(100, ge=1, description="VPT, VQT: prompt tokens (per block for the deep variants).")
    prompt_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="VPT, VQT: dropout on the prompt tokens.")
    cov_dim: int = Field(64, ge=2, description="MPN-COV: channels of the pooled covariance.")
    maws_tokens: int = Field(12, ge=1, description="FFVT: tokens selected from every block.")
    row0_chain: bool = Field(False, description="TransFG, RAMS: select by the CLS row carried through the maps "
                             "(same tokens, far cheaper) instead of the reference's full product of the maps")
    crop_tokens: int | None = Field(None, ge=1, description="GLSim, RAMS: patches whose box is cropped; "
                                    "None: 8, and 16 at image_size >= 448 (the reference's rule)")
    sim_metric: Literal["cos", "l1", "l2"] = Field("cos", description="GLSim: similarity of CLS and patches")
    cal_maps: int = Field(32, ge=1, description="CAL: WS-DAN attention maps.")
    cal_single_crop: bool = Field(False, description="CAL: evaluate on the image and one crop (2 passes) instead "
                                  "of the image, its mirror and three crops of each (8 passes)")
    simtrans_eval_dropout: bool = Field(False, description="SimTrans: keep the GCN's middle dropout (p 0.1) on in "
                                        "evaluation too, as the reference's code does (its eval logits are then random)")
    # Token reduction inside the backbone (model/reduction.py; CLCA caches around it).
    token_reduction: Literal["evit", "tome"] | None = Field(
        None, description="Token reduction inside the backbone, after the attention of each block of "
        "model.reduction_locs: evit (keep the tokens the CLS attends to most, fuse the rest into one) or tome "
        "(merge similar tokens, size-weighted); unset: none")
    keep_rate: float | None = Field(None, gt=0.0, le=1.0, description="Token reduction: the share kept at each "
                                    "reduction (EViT: of the tokens then; ToMe: of the patches, cumulatively)")
    reduction_locs: tuple[int, ...] | None = Field(
        None, description="Token reduction: the blocks (0-based) inside which tokens are reduced; unset: after "
        "blocks floor(i * depth / 4), i = 1, 2, 3 (3, 6, 9 of 12)")
    # The LoRA family (lora, dora, glora, ila_lora), through peft.
    lora_rank: int | None = Field(None, ge=1, description="LoRA rank r; unset: the method's (8; ila_lora 9, "
                                  "its LoRA count the closest to ILA++'s adapters)")
    lora_alpha: float | None = Field(None, gt=0.0, description="LoRA alpha: the update is scaled by alpha / r "
                                     "(alpha / sqrt(r) with lora_use_rslora); unset: the rank (scale 1)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on a LoRA's input (LoRA, DoRA)")
    lora_use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r")
    lora_init_weights: Literal["default", "gaussian", "orthogonal", "random"] = Field(
        "default", description="default: peft's (A Kaiming-uniform, B zero: the update starts at zero); gaussian: "
        "A Gaussian / r; orthogonal; random: B random too (the update does not start at zero)")
    lora_targets: str = Field(
        LORA_TARGETS["fused"], description="The modules that get a LoRA: a regular expression matched whole "
        "against the timm backbone's module names (peft's rule); default: every block's fused qkv projection, or "
        "its q and v projections on a backbone that keeps them apart (EVA-02 B and L)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="A plugin method's own settings, validated by its settings model.")
    # Backbone numerics.
    drop: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on attention/MLP branch outputs.")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="Stochastic depth rate (of the last block, "
                             "with the linear schedule).")
    drop_path_schedule: Literal["linear", "uniform"] = Field(
        "linear", description="Stochastic depth per block: timm's linear ramp, or the reference's same rate")
    numerics: Literal["backbone", "reference"] = Field(
        "backbone", description="Where the unset numerics come from (model.mean, model.std, model.layer_norm_eps, "
        "model.pos_embed_resize, data.resize_ratio, data.interpolation): the backbone's own pretrained config, or "
        "the reference's (ImageNet mean/std, eps 1e-12, corner-aligned bilinear position resampling, resize 1.34, "
        "bicubic), which apply on the reference's backbones only (ImageNet-21k ViTs and the micro ViT)")
    layer_norm_eps: float | None = Field(None, gt=0.0, description="Every LayerNorm's eps; unset: from model.numerics.")
    pos_embed_resize: Literal["bilinear_corners", "bicubic"] | None = Field(
        None, description="Position-grid resampling to model.image_size (bicubic: timm's); unset: from model.numerics.")
    mean: tuple[float, float, float] | None = Field(None, description="Input normalisation; unset: from model.numerics.")
    std: tuple[float, float, float] | None = Field(None, description="Input normalisation; unset: from model.numerics.")

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """Fill what the method derives from the backbone's depth (ILA positions, TransFG's and FFVT's
        blocks) where the backbone's name tells the depth; elsewhere they stay unset until the model
        is built (`for_backbone`). ILA positions given to a method without ILA are dropped, with a
        notice, so one grid or ``--set`` can hold ILA and other methods. A LoRA method's unset rank
        is its row's (``MethodSpec.lora_rank``), its unset targets the backbone's (:data:`LORA_TARGETS`); LoRA
        keys given to another method are dropped the same way. A method that works around a token reduction (CLCA) given none gets EViT at keep
        rate 1.0: its own modules at the default blocks, nothing reduced."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        try:
            spec = method_spec(data.get("method", cls.model_fields["method"].default))
        except (ValueError, TypeError):  # an unknown method is reported by field validation
            return data
        backbone = data.get("backbone", cls.model_fields["backbone"].default)
        if spec.lora_rank is not None:
            if data.get("lora_rank") is None:
                data["lora_rank"] = spec.lora_rank
            if "lora_targets" not in data and isinstance(backbone, str) and separate_qkv(backbone):
                data["lora_targets"] = LORA_TARGETS["separate"]
        else:  # like ILA positions: a grid's LoRA keys change no other row (nor its run key)
            given = [k for k in LORA_KEYS if k in data and data[k] != cls.model_fields[k].default]
            if given:
                warnings.warn(RecipeNotice(f"{' and '.join(f'model.{k}' for k in given)} dropped: method "
                                           f"{spec.name!r} has no LoRA"), stacklevel=2)
            for k in given:
                del data[k]
        if spec.needs_reduction and data.get("token_reduction") is None and data.get("keep_rate") is None:
            data.update(token_reduction="evit", keep_rate=1.0)  # CLCA alone: its cache and head, nothing reduced
        if isinstance(backbone, str):
            fill_numerics(data, "model", backbone, data.get("numerics", cls.model_fields["numerics"].default))
        return _fill_layout(spec, data, backbone_depth(backbone) if isinstance(backbone, str) else None,
                            derive_depth=not SAVED_RECIPE.get())

    def with_numerics(self, values: dict[str, Any]) -> ModelConfig:
        """This section with its unset numerics taken from ``values`` (read from the built backbone, whose
        name did not tell them)."""
        return self.model_copy(update={k: v for k, v in values.items()
                                       if k in NUMERIC_KEYS["model"] and getattr(self, k) is None})

    @property
    def numerics_resolved(self) -> bool:
        """Whether every numeric key of the model section is set (else the build reads them from timm)."""
        return all(getattr(self, k) is not None for k in NUMERIC_KEYS["model"])

    def for_backbone(self, depth: int) -> ModelConfig:
        """This section with what the method derives from the depth filled in, for a backbone of
        ``depth`` blocks whose name did not tell it (read from the built backbone)."""
        if self.resolved:
            return self
        try:
            return ModelConfig.model_validate(_fill_layout(method_spec(self.method), self.model_dump(), depth))
        except ValidationError as e:
            raise RecipeError(_model_errors(e) + f" (on the {depth}-block backbone {self.backbone!r})") from None

    @property
    def resolved(self) -> bool:
        """Whether every key the method derives from the backbone's depth is set."""
        return (self.ila_locs is not None and self.ila_ds_locs is not None
                and not (method_spec(self.method).replaces_blocks and self.depth is None)
                and not (self.token_reduction and self.reduction_locs is None))

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        method_spec(v)  # ValueError names the known methods, plugins included
        return v

    @model_validator(mode="after")
    def _options(self) -> ModelConfig:
        """``[model.options]`` belongs to a plugin method with a settings model, which validates it."""
        spec = method_spec(self.method)
        if spec.settings is None:
            if self.options:
                raise ValueError(f"model.options is for a plugin method's own settings; {self.method!r} takes none "
                                 f"(its settings are plain model.* keys), so remove {sorted(self.options)}")
            return self
        try:
            spec.settings.model_validate(self.options)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"model.options{'.' + where if where else ''} for method {self.method!r}: {first['msg']}") from None
        return self

    @field_validator("lora_targets")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression ({e})") from None
        return v

    @field_validator("ila_locs", "ila_ds_locs")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if any(i < 0 for i in v):
            raise ValueError("block indices must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError("block indices must be unique")
        return tuple(sorted(v))

    @field_validator("adapter_kernel", "ila_kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("kernel size must be odd (1, 3, 5, ...)")
        return v

    @model_validator(mode="after")
    def _some_ila(self) -> ModelConfig:
        """An ILA method given no ILA position at all (both lists empty) would train as another method;
        refused in a new recipe (a saved run's recipe loads as it was trained)."""
        spec = method_spec(self.method)
        if spec.has_ila and self.ila_locs == () and self.ila_ds_locs == () and not SAVED_RECIPE.get():
            same = spec.adapter or "linear"
            raise ValueError(f"method {self.method!r} with model.ila_ds_locs = [] and model.ila_locs = [] has no ILA "
                             f"and would train as {same!r}: give ILA positions (leave model.ila_ds_locs unset for "
                             f"the method's own) or --set model.method={same}")
        return self

    @model_validator(mode="after")
    def _geometry(self) -> ModelConfig:
        if set(self.ila_locs or ()) & set(self.ila_ds_locs or ()):
            raise ValueError(
                "model.ila_locs and model.ila_ds_locs share blocks "
                f"{sorted(set(self.ila_locs) & set(self.ila_ds_locs))}; a block takes at most one ILA"
            )
        reason = backbone_refusal(method_spec(self.method), self.backbone)
        if reason:
            raise ValueError(reason)
        patch = backbone_patch(self.backbone)
        depth = self.depth or backbone_depth(self.backbone)
        if patch is not None:
            check_geometry(self, depth=depth, patch=patch)
        return self


    @model_validator(mode="after")
    def _token_reduction(self) -> ModelConfig:
        """A token reduction has a keep rate, blocks inside the backbone, and a method whose every part that needs
        the patch grid (ILAs included) comes before its first reduction (`MethodSpec.reduction_refusal`); a method
        whose row needs one has it."""
        spec = method_spec(self.method)
        if self.token_reduction is None:
            if spec.needs_reduction:
                raise ValueError(f"method {self.method!r} caches around a token reduction: set model.token_reduction "
                                 "= 'evit' or 'tome' with model.keep_rate")
            given = [k for k in ("keep_rate", "reduction_locs") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{' and '.join('model.' + k for k in given)} set without model.token_reduction; "
                                 "set model.token_reduction = 'evit' or 'tome', or remove them")
            return self
        if self.keep_rate is None:
            raise ValueError(f"model.token_reduction {self.token_reduction!r} needs model.keep_rate (0 < rate <= 1)")
        locs = self.reduction_locs or ()
        if len(set(locs)) != len(locs) or any(i < 0 for i in locs) or list(locs) != sorted(locs):
            raise ValueError(f"model.reduction_locs {list(locs)}: give distinct block indices >= 0, ascending")
        depth = self.depth or backbone_depth(self.backbone)
        if depth is not None and any(i >= depth for i in locs):
            raise ValueError(f"model.reduction_locs {list(locs)} names a block outside the {depth}-block backbone")
        reason = spec.reduction_refusal(min(locs, default=depth or 1 << 30),
                                        (*(self.ila_locs or ()), *(self.ila_ds_locs or ())))
        if reason:
            raise ValueError(reason)
        return self


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = Field("sgd", description="Optimiser.")
    lr: float = Field(0.1, gt=0.0, description="Peak learning rate, reached at the end of the warmup.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(True, description="SGD: Nesterov momentum (when momentum > 0).")
    weight_decay: float = Field(0.0, ge=0.0, description="On weight matrices only (not on biases, norms, tokens).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW eps.")
    clip_grad: float | None = Field(1.0, ge=0.0, description="Max grad norm; 0 (or unset) disables it.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Cross-entropy label smoothing.")
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="Layer-wise learning-rate decay: the head at optim.lr, block i at "
        "lr * decay^(depth - i), the embedding at lr * decay^(depth + 1) (e.g. 0.65 to 0.75 fine-tuning CLIP or "
        "DINOv2); unset: off")


class ScheduleConfig(Section):
    name: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule after the warmup.")
    warmup_steps: int = Field(500, ge=0, description="Linear warmup iterations, counted inside the cosine.")
    warmup_lr: float = Field(1e-6, ge=0.0, description="Learning rate at the first step of the warmup.")
    min_lr: float = Field(1e-5, ge=0.0, description="Learning rate the cosine ends at.")
    warmup_epochs: int | None = Field(None, ge=0, description="The warmup in epochs (replaces schedule.warmup_steps; "
                                      "CLCA's 2); unset: schedule.warmup_steps")
    cooldown_epochs: int = Field(0, ge=0, description="The last epochs at schedule.min_lr, after the cosine, which "
                                 "ends before them (timm's cooldown; CLCA's 5)")


class TrainConfig(Section):
    epochs: int = Field(50, ge=1, description="Passes over the training split.")
    batch_size: int = Field(8, ge=1, description="Images per micro-batch and process.")
    split: Split = Field("train_val", description="The split trained on.")
    precision: Literal[PRECISIONS] = Field(
        "auto", description="auto: bf16 where the device supports it (fp16 on older GPUs), else fp32.")
    seed: int = Field(1, description="Seeds Python, NumPy and torch: initialisation, data order, augmentation.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    deterministic: bool = Field(False, description="torch's deterministic algorithms (slower; warns where there are none).")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available).")
    threads: int | None = Field(
        None, ge=0, description="torch intra-op CPU threads; None or 0 = the cores this process may use, "
        "less one per data-loader worker (see ufgir_cli.cores)."
    )
    compile: bool | None = Field(None, description="torch.compile; None = on CUDA only.")
    grad_checkpointing: bool = Field(False, description="Recompute block activations in the backward pass: "
                                     "less memory, more time.")
    channels_last: bool = Field(False, description="channels_last memory format for the images and the model.")
    sync_bn: bool = Field(False, description="Synchronise BatchNorm statistics across GPUs under torchrun.")
    checkpoint_every: int = Field(0, ge=0, description="Also checkpoint every N steps (0 = per epoch only).")
    skip_nonfinite: bool | None = Field(
        None, description="Let the fp16 loss scaler skip non-finite steps (counted); None = on with fp16 scaling."
    )


class EvalConfig(Section):
    split: Split = Field("test", description="The split evaluated during and after training (held out from train.split).")
    every: int = Field(10, ge=0, description="Evaluate every N epochs (0 = only at the end).")
    batch_size: int | None = Field(None, ge=1, description="Evaluation batch size; None: train.batch_size.")


class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files (scalars, hparams, the recipe) into the run folder.")
    log_every: int = Field(20, ge=1, description="Steps between metric log lines.")


class SweepConfig(Section):
    lrs: tuple[float, ...] | None = Field(
        None, description="Learning rates `ufgir sweep` and `ufgir reproduce` try in phase 1 (unset: the paper's "
        "SGD grid 0.3, 0.1, 0.03, 0.01, 0.003); --lr overrides them")

    @field_validator("lrs")
    @classmethod
    def _positive_distinct(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or any(not x > 0 for x in v) or len(set(v)) != len(v)):
            raise ValueError("give distinct positive learning rates")
        return v
