"""The LoRA family through Hugging Face peft: LoRA, DoRA, GLoRA, and ILA with LoRA (``ila_lora``).

peft is the field's library for LoRA and its variants and adapts any ``nn.Module``: these methods
inject its layers into the timm backbone (``peft.inject_adapter_in_model``) on the modules whose timm
names match ``model.lora_targets`` as a whole (peft's rule for a string), by default every block's
fused ``qkv`` projection. The LoRA paper adapts attention's projections (W_q and W_v), and the ViT
PETL benchmarks (NOAH, V-PETL) put LoRA on the query and value projections; timm fuses q, k and v
into one Linear, so one LoRA per block covers all three. On a backbone that keeps them apart (EVA-02
B and L) the default is its q and v projections (``recipe_sections.LORA_TARGETS``).

peft (and the transformers and accelerate it pulls in, seconds to import) is imported only here,
and only when such a model is built: ``import ufgir_cli.model`` and ``ufgir --help`` never load it.

What these methods keep as ufgir does everywhere else:

- the CLS token stays frozen (peft's convention; ILA with LoRA trains it, as ILA++ does), so the
  trainable count is the one peft's ``get_nb_trainable_parameters`` reports for the same
  configuration on the same timm model with ``modules_to_save=["head"]``;
- checkpoints, adapter deltas and the backbone's sha256 use timm's names (``qkv.weight``,
  ``qkv.lora_A.weight``), never peft's ``qkv.base_layer.weight`` / ``qkv.lora_A.default.weight``
  (`model.wrapped`);
- every targeted module must change ``model(x)`` (`onpath`); the CLS-only last block calls a
  wrapped ``qkv`` instead of reading its weight (`model.attention.cls_attention`);
- a traced export (ONNX, pt2) holds the backbone with the updates merged into its weights (peft's
  ``merge``), the plain ViT's graph and cost.

Initialisations that rewrite the frozen weights (PiSSA, OLoRA, LoftQ) or need data (EVA, CorDA) are
left out: the backbone must be re-created bit for bit from ``model.weights``.
"""

from __future__ import annotations

import copy
import re
from typing import Any, ClassVar

from torch import nn

from ...errors import CheckpointError, ExportError, RecipeError
from ...methods import MethodSpec
from ...recipe import ModelConfig
from ..wrapped import keep_unwrapped_names
from .base import UfgirViT
from .linear import LinearHead
from .onpath import PathCheck, collapse

#: ``model.lora_init_weights`` -> peft's ``init_lora_weights``.
LORA_INIT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal", "random": False}


def _peft():
    try:
        import peft
    except ImportError:  # pragma: no cover - a dependency of ufgir; only a broken install lacks it
        raise RecipeError("the LoRA family needs the package peft: pip install peft") from None
    return peft


def _tuner_layers(vit: nn.Module) -> dict[str, nn.Module]:
    """The layers peft injected, by timm name."""
    base = _peft().tuners.tuners_utils.BaseTunerLayer
    return {n: m for n, m in vit.named_modules() if isinstance(m, base)}


class LoRA(LinearHead):
    """peft's LoRA on the modules ``model.lora_targets`` names; timm's head on the CLS token."""

    #: Adapter kind, as the refusals name it.
    kind: ClassVar[str] = "LoRA"
    block_label = "LoRA"
    #: The layer types it adapts (peft's LoRA takes a few more; the ViT has these).
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)
    merges = "the LoRA updates (peft's merge)"
    #: The parts of a model that a peft adapter folder of a timm ViT holds: its adapters and the classifier.
    peft_parts: ClassVar[tuple[str, ...]] = ("head", "lora")
    #: Recipe keys the method reads besides ``lora_rank`` and ``lora_targets``.
    keys: ClassVar[tuple[str, ...]] = ("lora_alpha", "lora_dropout", "lora_use_rslora", "lora_init_weights")

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        self.rank: int = cfg.lora_rank or spec.lora_rank or 8
        self.alpha: float = cfg.lora_alpha or float(self.rank)
        self.dropout, self.rslora, self.init = cfg.lora_dropout, cfg.lora_use_rslora, cfg.lora_init_weights
        self.targets: str = cfg.lora_targets
        self.backbone: str = cfg.backbone
        defaults = {k: ModelConfig.model_fields[k].default for k in ("lora_alpha", "lora_dropout", "lora_use_rslora",
                                                                       "lora_init_weights")}
        unused = [f"model.{k}" for k, d in defaults.items() if k not in self.keys and getattr(cfg, k) != d]
        if unused:
            raise RecipeError(f"{' and '.join(unused)} do nothing for method {self.name!r} ({self.kind} through peft "
                              "has no such setting); leave them unset")

    def peft_config(self):
        """The peft configuration these settings make."""
        return _peft().LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                  use_rslora=self.rslora, init_lora_weights=LORA_INIT[self.init],
                                  target_modules=self.targets)

    def target_names(self, vit: nn.Module) -> list[str]:
        """The backbone's modules that ``model.lora_targets`` matches as a whole (timm names)."""
        rx = re.compile(self.targets)
        return [n for n, _ in vit.named_modules() if n and rx.fullmatch(n)]

    def _subject(self) -> str:
        return f"model.lora_targets '{self.targets}' ({self.name} on {self.backbone})"

    # ---- building -------------------------------------------------------------------------
    def adapt_backbone(self, model: UfgirViT) -> None:
        vit = model.vit
        names = self.target_names(vit)
        linears = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear) and not n.startswith("head")]
        if not names:
            raise RecipeError(f"{self._subject()} matches no module; its Linear layers are {collapse(linears)}")
        head = [n for n in names if n == "head" or n.startswith("head.")]
        if head:
            raise RecipeError(f"{self._subject()} matches the classifier {head[0]}, which trains whole already; "
                              "leave it out of the pattern")
        other = [(n, type(m).__name__) for n in names if not isinstance(m := vit.get_submodule(n), self.layer_types)]
        if other:
            kinds = " and ".join(t.__name__ for t in self.layer_types)
            raise RecipeError(f"{self._subject()} matches {other[0][0]} (a {other[0][1]}); {self.kind} adapts {kinds} "
                              f"layers: the backbone's Linear layers are {collapse(linears)}")
        try:
            _peft().inject_adapter_in_model(self.peft_config(), vit, adapter_name="default")
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"{self._subject()}: peft cannot adapt them ({first}); Linear layers are "
                              f"{collapse(linears)}") from None
        if hasattr(vit, "peft_config"):  # peft leaves its configuration on the model; ours is the recipe
            del vit.peft_config
        for layer in _tuner_layers(vit).values():
            keep_unwrapped_names(layer)

    def _adapter_params(self, model: UfgirViT) -> dict[str, list[nn.Parameter]]:
        return {n: [p for k, p in layer.named_parameters() if not k.startswith("base_layer.")]
                for n, layer in _tuner_layers(model.vit).items()}

    def trainable_parts(self, model: UfgirViT) -> dict[str, list[nn.Module | nn.Parameter]]:
        return {"lora": [p for ps in self._adapter_params(model).values() for p in ps]}

    def path_check(self, model: UfgirViT) -> PathCheck:
        base = _peft().tuners.tuners_utils.BaseTunerLayer
        inside = tuple(f"{n}." for n in _tuner_layers(model.vit))
        candidates = {n: m for n, m in model.vit.named_modules()
                      if isinstance(m, nn.Linear | nn.Conv2d | base) and not n.startswith(("head", *inside))}
        key = f"{type(self).__name__}|" + model.cfg.model_dump_json(exclude={"weights", "num_classes", "image_size"})
        # The hint runs every block on every token: a CLS-only last block calls a wrapped qkv, so each
        # Linear the full forward reaches can take an adapter.
        return PathCheck(self._subject(), self._adapter_params(model), candidates,
                         hint_run=lambda x: model.forward_head(model.forward_features(x)), key=key)

    def peft_export_config(self, model: UfgirViT):
        """This method's peft configuration with timm's classifier (``head``) as a module to save; refused
        when the model trains more than peft's adapter folder holds (ILA with LoRA: the ILAs, the CLS token)."""
        extra = [p for p in model.plan.trains if p not in self.peft_parts]
        if extra:
            raise ExportError(f"--format peft: method {self.name!r} also trains {', '.join(extra)}, which a peft "
                              "adapter folder cannot hold; export --format safetensors, onnx or pt2 (--merge folds "
                              "its LoRA)")
        config = self.peft_config()
        config.modules_to_save = ["head"]
        return config

    def export_model(self, model: UfgirViT) -> UfgirViT:
        """A copy whose wrapped layers are their base layers with the update merged in (peft's merge)."""
        merged = copy.deepcopy(model)
        for name, layer in list(_tuner_layers(merged.vit).items()):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.vit.get_submodule(parent) if parent else merged.vit, child, layer.get_base_layer())
        return merged


class DoRA(LoRA):
    """peft's DoRA: LoRA on the direction of each target weight and a learned magnitude per output."""

    kind = block_label = "DoRA"
    merges = "the DoRA updates (peft's merge)"

    def peft_config(self):
        config = super().peft_config()
        config.use_dora = True
        return config


class GLoRA(LoRA):
    """peft's GLoRA (peft >= 0.20): W + W*A + B and b + b*D + E + W C; A, B, C of rank r (peft's
    default layout: A and B low-rank, C low-rank, D and E one scalar each). peft computes it as a
    second Linear with the effective weight, so an unmerged forward costs one more pass through
    each target module; a traced export merges it."""

    kind = block_label = "GLoRA"
    merges = "the GLoRA updates (peft's merge)"
    keys = ("lora_init_weights",)
    layer_types = (nn.Linear,)

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        super().__init__(spec, cfg)
        if self.init not in ("default", "random"):
            raise RecipeError(f"model.lora_init_weights {self.init!r}: GLoRA starts at zero (default) or random "
                              "(random); choose one of those")

    def peft_config(self):
        return _peft().GloraConfig(r=self.rank, target_modules=self.targets, init_weights=self.init == "default")


#: peft configuration fields that every adapter folder carries (bookkeeping) or that the method's own
#: keys answer; any other field away from peft's default is a setting ufgir's LoRA family lacks.
_PEFT_ANSWERED = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                            "revision", "inference_mode", "modules_to_save", "r", "target_modules", "lora_alpha",
                            "lora_dropout", "use_rslora", "init_lora_weights", "use_dora", "init_weights"})


def _targets_regex(targets: str | list[str] | set[str] | None) -> str:
    """peft's ``target_modules`` as ``model.lora_targets``, a regex matched against whole module names: a
    string is one already (peft full-matches it too); a list names modules by their last name parts."""
    if isinstance(targets, str):
        return targets
    names = sorted(targets or [])
    return "(?:.*\\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"


def settings_from_peft(config: Any, where: str) -> dict[str, Any]:
    """The method (``lora``, ``dora`` or ``glora``) and the ``model.*`` keys that run a peft adapter
    configuration (``ufgir import-peft``); a CheckpointError naming the first setting ufgir lacks."""
    peft = _peft()
    kind = type(config).__name__
    if isinstance(config, peft.GloraConfig):
        out = {"method": "glora", "lora_init_weights": "default" if config.init_weights else "random"}
    elif isinstance(config, peft.LoraConfig):
        inits = {v: k for k, v in LORA_INIT.items()}
        init = config.init_lora_weights
        if not isinstance(init, bool | str) or init not in inits:
            raise CheckpointError(f"{where}: init_lora_weights={init!r} rewrites the frozen weights or needs data; "
                                  f"ufgir attaches adapters to the backbone as it is ({', '.join(map(repr, inits))})")
        out = {"method": "dora" if config.use_dora else "lora", "lora_alpha": float(config.lora_alpha),
               "lora_dropout": float(config.lora_dropout), "lora_use_rslora": bool(config.use_rslora),
               "lora_init_weights": inits[init]}
    else:
        raise CheckpointError(f"{where}: a {kind} ({config.peft_type}) is not one ufgir runs; it imports LoRA, DoRA "
                              "and GLoRA adapters (LoraConfig, GloraConfig)")
    if config.task_type is not None:
        raise CheckpointError(f"{where}: task_type {config.task_type} is for a transformers model; a timm ViT's "
                              "adapter has none")
    default = type(config)().to_dict()
    for key, value in config.to_dict().items():
        if key not in _PEFT_ANSWERED and value != default.get(key):
            raise CheckpointError(f"{where}: {kind}.{key} = {value!r}, a setting ufgir's {out['method']} lacks "
                                  "(it takes r, lora_alpha, lora_dropout, use_rslora, target_modules)")
    return {**out, "lora_rank": int(config.r), "lora_targets": _targets_regex(config.target_modules)}


__all__ = ["DoRA", "GLoRA", "LORA_INIT", "LoRA", "settings_from_peft"]
