"""What every method object answers: the contract between `UfgirViT` and one method.

`UfgirViT` runs the backbone's blocks with the prompts, ILAs and parallel adapters that the method's
table row asks for. Everything else that makes a method itself lives in its :class:`Method` object:
the head it builds, how many backbone passes it runs and how they become logits, its training loss,
its evaluation modes and their cost, what it selects or crops (as a typed :class:`Selection`),
whether a traced graph can hold it, and how its reference checkpoints' keys map. Callers ask the
object; nobody outside a method's own module compares method, head or selector names.

A method object holds settings, never tensors: its modules (the head, an extra CLS token) are
registered on the model under the names state dicts have always used (``head.*``, ``anchor_cls``), and
every call receives the model. Forward never reads the recipe: the object took what it needs from
the model config when it was built.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ...errors import ExportError
from ...methods import MethodSpec
from ...recipe import ModelConfig
from ..precision import float32_region
from .onpath import PathCheck

#: The model a method runs on (`model.vit.UfgirViT`); named, not imported: the model imports the methods.
UfgirViT = nn.Module
#: A method's change to the token stream after one block: (that block's output tokens (B, T, D), its
#: post-softmax attention (B, heads, T, T)) -> the tokens the next block receives (see `Method.stream_edits`).
StreamEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainStep(NamedTuple):
    """What the training entry point returns: the loss to back-propagate and the logits (B, C) that a
    training accuracy would read."""

    loss: torch.Tensor
    logits: torch.Tensor


@dataclass
class PatchPanel:
    """Patches picked at one step, drawn on the image: per image, the patch indices (row-major on the
    selection's grid) it ``picked`` and those it marks apart (``anchors``, drawn in another colour)."""

    label: str
    picked: list[torch.Tensor]
    anchors: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Selection:
    """What a method looked at for a batch of B images, for figures and analysis.

    ``boxes`` (K, B, 4): K boxes per image in pixels [top, bottom, left, right), with ``crops``
    (K, B, 3, S, S), the images its further passes saw, and one ``labels`` entry per box. ``patches``:
    per image, the patch indices (row-major on ``grid``, 0 = the top-left patch) of the tokens it
    picked. ``steps``: patches picked at several steps, one panel each (SimTrans: the parts and the
    anchor of each structure injection). ``what`` says it in words."""

    what: str
    grid: tuple[int, int]
    boxes: torch.Tensor | None = None
    crops: torch.Tensor | None = None
    labels: tuple[str, ...] = ()
    patches: list[torch.Tensor] = field(default_factory=list)
    steps: list[PatchPanel] = field(default_factory=list)


class Method:
    """The base: timm's linear head on the pooled token, one backbone pass, cross-entropy.

    Subclasses override what differs. Class attributes state facts callers used to derive from names:

    - ``single_pass``: ``forward_head(forward_features(x))`` gives the logits (else only ``model(x)``);
    - ``traceable``: a traced graph (ONNX, pt2) can hold it (False when a first pass picks a box
      whose size depends on the image);
    - ``timm_head``: timm's own Linear is the classifier (the backbone is built with ``num_classes``);
    - ``reads_intermediates``: the head reads every block's output, not only the final tokens;
    - ``train_passes``: backbone passes per image in a training step;
    - ``min_train_batch``: the fewest images a training batch may hold on one rank (2 for a head with
      BatchNorm, whose training statistics need two).
    """

    single_pass: ClassVar[bool] = True
    traceable: ClassVar[bool] = True
    timm_head: ClassVar[bool] = True
    reads_intermediates: ClassVar[bool] = False
    train_passes: ClassVar[int] = 1
    min_train_batch: ClassVar[int] = 1
    #: What the method tunes inside the backbone's blocks, as ``ufgir inspect`` lists it ("LoRA").
    block_label: ClassVar[str] = ""
    #: What `export_model` folds into the backbone's weights, in words, for ``ufgir export --merge`` ("the
    #: LoRA updates"); empty when nothing folds (the export model is then the model itself).
    merges: ClassVar[str] = ""
    #: Reference-checkpoint key prefixes of the head -> ours (see `map_upstream_key`).
    upstream_head_keys: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, spec: MethodSpec, cfg: ModelConfig):
        self.spec = spec
        #: A plugin's validated ``[model.options]`` (None for the built-in methods).
        self.options = spec.settings.model_validate(cfg.options) if spec.settings is not None else None

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ---- building -------------------------------------------------------------------------
    def build_head(self, vit: nn.Module, num_classes: int) -> nn.Module | None:
        """The method's own classifier, or None for timm's Linear head (``vit.head``)."""
        return None

    def extra_parameters(self, vit: nn.Module) -> dict[str, nn.Parameter | nn.Module]:
        """Parameters (or modules) the method adds beside its head, registered on the model under
        these names."""
        return {}

    def backbone_dropout(self, vit: nn.Module, rate: float) -> float:
        """Where the recipe's ``model.drop`` applies: the rate of the model's dropout on every block's
        attention and MLP outputs (the reference backbone's placement, the default). A method whose
        reference drops elsewhere puts its own dropout modules into ``vit`` and returns 0.0."""
        return rate

    def stream_edits(self, model: UfgirViT) -> dict[int, StreamEdit]:
        """How the method changes the token stream, by block: every pass through the backbone
        (`UfgirViT.encode`) hands the output of each block named here, with that block's attention
        maps, to its edit and goes on with what the edit returns. None by default."""
        return {}

    #: Whether the edits of `stream_edits` read the block's attention maps (computing them costs the
    #: explicit attention path); CLCA's cache does not.
    edit_reads_maps: ClassVar[bool] = True

    def no_weight_decay(self, model: UfgirViT) -> set[str]:
        """Names of the method's own parameters (`extra_parameters`) kept out of weight decay."""
        return set()

    def suffix_tokens(self, model: UfgirViT) -> torch.Tensor | None:
        """Tokens (1, n, D) the method appends after the patch tokens at the embedding, before the
        pre-norm (CLCA's carrier token with its position); None by default."""
        return None

    def suffix_count(self, model: UfgirViT) -> int:
        """How many tokens `suffix_tokens` appends."""
        return 0

    def tokens_added(self, model: UfgirViT) -> dict[int, int]:
        """Per block, how many tokens its stream edit appends to the sequence (CLCA's recovered cache),
        for the geometry; none by default."""
        return {}

    def block_notes(self, model: UfgirViT) -> dict[int, str]:
        """What the method itself does after some blocks, in a few words (``ufgir inspect``)."""
        return {}

    # ---- the backbone's own modules (LoRA, SSF, BitFit) ------------------------------------
    def adapt_backbone(self, model: UfgirViT) -> None:
        """Change backbone modules in place before the model freezes (wrap the layers a LoRA or SSF
        adapts; their state dicts keep timm's names, `model.wrapped`). By default nothing."""

    def trainable_parts(self, model: UfgirViT) -> dict[str, list[nn.Module | nn.Parameter]]:
        """The parts of the row's ``trains`` that live inside the backbone (``lora``, ``ssf``,
        ``bias``): part -> the modules or parameters that train."""
        return {}

    def path_check(self, model: UfgirViT) -> PathCheck | None:
        """The backbone modules this method adapts and their adapter parameters, each of which must
        change ``model(x)`` (checked once per build, `onpath.check_on_path`); None: nothing adapted."""
        return None

    def export_model(self, model: UfgirViT) -> UfgirViT:
        """The model a traced graph (ONNX, pt2) and ``ufgir export --merge`` hold, the same function as
        ``model``: LoRA and SSF give a copy with their updates merged into the weights (`merges` says
        what). By default the model itself."""
        return model

    def peft_export_config(self, model: UfgirViT) -> Any:
        """The peft configuration of an adapter folder that holds this trained model on a plain timm
        ViT, the classifier in ``modules_to_save`` (``ufgir export --format peft``). By default refused
        in one line: peft holds nothing like the method."""
        raise ExportError(f"--format peft: method {self.name!r} ({self.spec.display_name}) has no peft equivalent; "
                          "export --format safetensors, onnx or pt2 instead")

    # ---- evaluation modes -----------------------------------------------------------------
    @property
    def eval_modes(self) -> dict[str, int]:
        """Evaluation modes of different cost, name -> backbone passes per image; empty when there
        is only one. ``forward(x, eval_mode=name)`` runs one; None runs the recipe's."""
        return {}

    @property
    def eval_mode(self) -> str | None:
        """The recipe's evaluation mode (a key of `eval_modes`), None when there is one mode."""
        return None

    def passes(self, eval_mode: str | None = None) -> int:
        """Backbone passes per image in evaluation."""
        return self.eval_modes.get(eval_mode or self.eval_mode, 1) if self.eval_modes else 1

    def _mode(self, eval_mode: str | None) -> str | None:
        if eval_mode is not None and eval_mode not in self.eval_modes:
            known = ", ".join(self.eval_modes) or "none"
            raise ValueError(f"{self.name} has no evaluation mode {eval_mode!r} (its modes: {known})")
        return eval_mode or self.eval_mode

    # ---- running --------------------------------------------------------------------------
    def pools_cls(self, model: UfgirViT) -> bool:
        """The logits read the last block's CLS row and nothing else of it (so that block may run for
        that row alone where nothing mixes tokens; see `UfgirViT.cls_only_last_block`)."""
        return model.vit.global_pool == "token" and getattr(model.vit, "attn_pool", None) is None

    def forward(self, model: UfgirViT, x: torch.Tensor, eval_mode: str | None = None) -> torch.Tensor:
        """Logits (B, C) of images (B, 3, S, S)."""
        self._mode(eval_mode)
        if not model.last_block_cls_only or not model.cls_only_last_block:
            return model.forward_head(model.forward_features(x))
        return model.forward_head(model.vit.norm(model.encode(x, last_cls_only=True)[0]))

    def forward_train(self, model: UfgirViT, x: torch.Tensor, target: torch.Tensor,
                      criterion: nn.Module) -> TrainStep:
        """One training step's loss and logits. By default ``criterion`` (the recipe's cross-entropy)
        on the logits, in float32 outside autocast."""
        logits = self.forward(model, x)
        with float32_region(logits):
            return TrainStep(criterion(logits.float(), target), logits)

    def forward_head(self, model: UfgirViT, x: torch.Tensor, pre_logits: bool = False,
                     intermediates: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (or the head's input) from the final normed tokens (B, T, D). A backbone that pools more
        than its CLS token (an attention pool, the patch average) pools its own tokens: prompt rows that
        stay (VPT-shallow's) are left out, as timm's head never saw them."""
        P, n = model.num_prefix_tokens, model.vit.num_prefix_tokens
        if P > n and model.vit.global_pool != "token":
            x = torch.cat([x[:, :n], x[:, P:]], dim=1)                          # (B, n + HW, D)
        return model.vit.forward_head(x, pre_logits=pre_logits)

    def select(self, model: UfgirViT, x: torch.Tensor) -> Selection | None:
        """What the method looks at in normalised images ``x`` (eval mode), None when it selects nothing."""
        return None

    # ---- reference checkpoints ------------------------------------------------------------
    @classmethod
    def upstream_settings(cls, config: argparse.Namespace) -> dict[str, Any]:
        """Model-config keys of this method that a reference config sets."""
        return {}

    @classmethod
    def upstream_recipe(cls, config: argparse.Namespace) -> dict[str, Any] | None:
        """The whole recipe (as a dict) for a reference whose configuration is laid out its own way (CLCA's
        ``train.py`` arguments); None: the fgir_vit layout, which `model.convert` reads."""
        return None

    def map_upstream_key(self, key: str, state: dict[str, torch.Tensor]) -> str | None:
        """Our key for a reference key of this method's own modules, or None when it is not one.
        ``""`` drops a key that only repeats another (checked here)."""
        for ref, ours in self.upstream_head_keys:
            if key.startswith(ref):
                return ours + key[len(ref):]
        return None

    def upstream_normalise(self, key: str) -> str:
        """A reference key with the method's own wrapping removed."""
        return key

    def upstream_rename(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference state dict (``model.``/``module.`` prefixes removed) under the names the
        reference's ILA backbone uses, key by key through `upstream_normalise` by default. A method
        whose reference names its own ViT copy differently renames the whole dict here."""
        return {self.upstream_normalise(k): t for k, t in state.items()}

    def upstream_missing(self, model: UfgirViT) -> dict[str, torch.Tensor]:
        """Tensors the reference never saved, at the values a fresh start gives them."""
        return {}
