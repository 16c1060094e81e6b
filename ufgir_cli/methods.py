"""The method table: the one place that says what each training method is.

A row names a method and says, as data, everything the rest of the package needs to know about it:
its family, a one-line description, which parts of the model train, which modules it adds (parallel
adapter kind, prompt kind, where its inter-layer adapters go by default), how a reference-code
checkpoint's config is recognised as this method, its packaged recipe, what it needs of a backbone,
and which method object runs it (``impl``). Recipe validation, ``ufgir recipes list``, ``ufgir inspect``
and ``import-upstream`` read this table; ``model/methods/`` holds the method objects (one module per
family), so adding a method is one row here, one module (or a class in its family's), a recipe under
``recipes/`` and its tests. Methods of other installed packages join through the ``ufgir.methods``
entry point group (`plugins`).

It sits at the bottom layer beside ``recipe.py`` and imports neither torch nor pydantic: the recipe
types validate against it without importing the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .errors import did_you_mean
from .geometry import FAMILIES, backbone_family, scale_block

Family = Literal["petl", "ila", "fgir", "full"]
#: Parts of a model that can train. "all" means every parameter (full fine-tuning). "lora": the low-rank
#: adapters peft injects into the backbone's target modules; "ssf": per-channel scales and shifts on
#: the backbone's operations; "bias": every bias of the backbone (BitFit).
Part = Literal["head", "cls", "anchor", "adapters", "ila", "prompts", "lora", "ssf", "bias", "all"]
#: A reference-config flag test: True = set (truthy), False = unset or falsy, a string = the flag's
#: lower-cased text contains it.
FlagTest = bool | str
#: What a method needs of its backbone, so that an impossible combination is refused when the recipe
#: loads, not at the first forward: a CLS token to read, a patch grid up to its last block (convolutions,
#: boxes, maps on the grid), an absolute position embedding (resampled to the input size). A method that
#: classifies what timm's head pools (the CLS token, an attention pool, the patch average) needs none.
Need = Literal["cls_token", "patch_grid", "abs_pos_embed", "token_reduction"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: Family
    description: str
    trains: tuple[Part, ...]
    adapter: Literal["adapter", "convpass"] | None = None  # parallel adapters in every block
    prompts: Literal["shallow", "deep", "vqt"] | None = None  # vqt: per-block query-only prompts
    #: The method object that runs it: a key of ``model.methods.REGISTRY`` (built-in methods), or
    #: ``"package.module:Class"`` (a plugin's, imported only when a model is built). The object owns the
    #: head, what it selects or crops, its passes, loss and evaluation modes.
    impl: str = "linear"
    needs: tuple[Need, ...] = ()
    class_token: bool = True  # False: the backbone has no CLS token (MPN-COV pools the patch tokens)
    final_norm: bool = True  # False: no LayerNorm after the last block (IFA reads pre-norm CLS tokens)
    #: Default down-sampling ILA positions as on a 12-block ViT, scaled to the backbone's depth
    #: (`ds_locs_for`): the paper's after-blocks-3-and-7.
    ila_ds_locs: tuple[int, ...] = ()
    ila_rest: bool = False  # default: a same-resolution ILA after every block without a DS-ILA
    #: The backbone's last blocks that the method leaves out for a block of its own (TransFG and FFVT run
    #: the first D - 1 blocks, then one more block on the tokens they select).
    replaces_blocks: int = 0
    #: The LoRA family's default rank (``model.lora_rank`` when the recipe leaves it unset); None for
    #: methods without LoRA.
    lora_rank: int | None = None
    #: The method works around a token reduction (CLCA's cache): the recipe must set ``model.token_reduction``.
    needs_reduction: bool = False
    #: Where a method that needs the patch grid needs it: after every block ("every_block": convolutions,
    #: boxes, maps on the grid), or only up to its last ILA ("ila": the ILA family with plain parallel
    #: adapters or LoRA, which past its last ILA runs on any sequence of tokens, so a token reduction may follow).
    grid_for: Literal["every_block", "ila"] = "every_block"
    upstream: tuple[tuple[str, FlagTest], ...] = ()  # how import-upstream recognises it
    recipe: str = ""  # packaged recipe name; the method's name when empty
    title: str = ""  # as the paper and figures name it ("ILA++"); the name when empty
    #: A plugin's own settings: a pydantic model that validates the recipe's ``[model.options]`` table.
    #: Built-in methods read today's flat ``model.*`` keys instead and take no options.
    settings: type | None = None
    #: Where a plugin came from ("entry point NAME of DIST"); empty for the built-in rows.
    origin: str = ""

    @property
    def has_ila(self) -> bool:
        return self.family == "ila"

    @property
    def takes_reduction(self) -> bool:
        """Whether a token reduction inside the backbone can run under it somewhere: it needs no patch grid past
        its ILAs, no per-block prompts (shallow prompts are prefix tokens, protected like the CLS) and selects no
        fixed number of tokens per block into a block of its own (FFVT). Where its ILAs allow one: `reduction_refusal`."""
        return self._reduction_obstacle() is None

    def _reduction_obstacle(self) -> str | None:
        if "patch_grid" in self.needs and self.grid_for == "every_block":
            return f"{_NEED_WORDS['patch_grid']} up to its last block"
        if self.prompts not in (None, "shallow"):
            return f"inserts per-block prompts ({self.prompts})"
        if self.replaces_blocks:
            return "selects a fixed number of tokens per block into a block of its own"
        return None

    def reduction_refusal(self, first: int, ila_blocks: tuple[int, ...]) -> str | None:
        """Why a token reduction whose first reduction is inside block ``first`` cannot run under this method with
        ILAs after ``ila_blocks``, in one line, from its declared needs; None when it can. A reduction leaves no patch
        grid, so every part that needs one (an ILA included) must come before it."""
        obstacle = self._reduction_obstacle()
        if obstacle is not None:
            return (f"method {self.name!r} {obstacle}, which a token reduction takes away; unset model.token_reduction "
                    f"or choose a method that can take one ({', '.join(m.name for m in TABLE if m.takes_reduction)})")
        late = sorted(i for i in ila_blocks if i >= first)
        if late:
            return (f"method {self.name!r} puts an ILA after block{'s' if len(late) > 1 else ''} "
                    f"{', '.join(map(str, late))}, which needs the patch grid that the token reduction inside block "
                    f"{first} takes away; reduce only after its last ILA (model.reduction_locs all > {max(ila_blocks)}) "
                    "or unset model.token_reduction")
        return None

    @property
    def recipe_name(self) -> str:
        return self.recipe or self.name

    @property
    def display_name(self) -> str:
        return self.title or self.name

    def ds_locs_for(self, depth: int) -> tuple[int, ...]:
        """Down-sampling ILA positions on a ``depth``-block backbone when the recipe leaves
        ``model.ila_ds_locs`` unset; ValueError when the backbone is too shallow to hold them apart."""
        locs = tuple(scale_block(b, depth) for b in self.ila_ds_locs)
        if len(set(locs)) != len(locs):
            raise ValueError(f"method {self.name!r} puts {len(locs)} down-sampling ILAs after blocks "
                             f"{', '.join(map(str, self.ila_ds_locs))} of 12; a {depth}-block backbone has no room "
                             f"for them apart: set model.ila_ds_locs")
        return locs

    def default_ila_locs(self, depth: int, ds_locs: tuple[int, ...]) -> tuple[int, ...]:
        """Same-resolution ILA positions when the recipe leaves ``model.ila_locs`` unset."""
        return tuple(i for i in range(depth) if i not in ds_locs) if self.ila_rest else ()


_PETL = ("head", "cls")
_NO_EXTRAS = (("ila", False), ("adapter", False), ("prompt", False))
_GRID: tuple[Need, ...] = ("patch_grid",)
_CLS: tuple[Need, ...] = ("cls_token",)

TABLE: tuple[MethodSpec, ...] = (
    MethodSpec("linear", "petl", "Linear probe: frozen ViT, only the head and the CLS token train",
               _PETL, upstream=(("freeze_backbone", True), *_NO_EXTRAS), title="Linear probe"),
    MethodSpec("full", "full", "Full fine-tuning of every backbone weight",
               ("all",), upstream=(("freeze_backbone", False), *_NO_EXTRAS), title="Full fine-tuning"),
    MethodSpec("vpt_shallow", "petl", "VPT-shallow: learned prompt tokens inserted once before block 0",
               (*_PETL, "prompts"), prompts="shallow",
               upstream=(("prompt", True), ("ila", False), ("adapter", False)), title="VPT-shallow"),
    MethodSpec("vpt_deep", "petl", "VPT-deep: learned prompt tokens per block, replaced at every block",
               (*_PETL, "prompts"), prompts="deep",
               upstream=(("prompt", "deep"), ("ila", False), ("adapter", False)), title="VPT-deep"),
    MethodSpec("adapter", "petl", "Parallel bottleneck adapters beside attention and MLP in every block",
               (*_PETL, "adapters"), adapter="adapter", upstream=(("adapter", True), ("ila", False)), title="Adapter"),
    MethodSpec("convpass", "petl", "ConvPass: parallel adapters with a convolution on the patch grid",
               (*_PETL, "adapters"), adapter="convpass", needs=_GRID, upstream=(("adapter", "convpass"), ("ila", False)), title="ConvPass"),
    MethodSpec("vqt", "petl", "VQT: per-block query-only prompts whose outputs, with the CLS token, feed the head",
               (*_PETL, "prompts"), prompts="vqt", impl="vqt", needs=_CLS,
               upstream=(("prompt", "vqt"), ("ila", False), ("adapter", False)), title="VQT"),
    # Today's PETL baselines. The LoRA family (through peft) keeps the CLS token frozen, peft's convention.
    MethodSpec("lora", "petl", "LoRA (through peft): low-rank updates of the backbone's target modules (default: "
               "every block's qkv), rank 8; CLS token frozen", ("head", "lora"), impl="lora", lora_rank=8, title="LoRA"),
    MethodSpec("dora", "petl", "DoRA (through peft): LoRA on the direction of each target weight plus a learned "
               "magnitude per output channel; CLS token frozen", ("head", "lora"), impl="dora", lora_rank=8, title="DoRA"),
    MethodSpec("glora", "petl", "GLoRA (through peft): W + W*A + B and b + b*D + E + W C on each target module, A, B, C "
               "low-rank; CLS token frozen", ("head", "lora"), impl="glora", lora_rank=8, title="GLoRA"),
    MethodSpec("ssf", "petl", "SSF: a learned per-channel scale and shift after the patch embedding, every Linear and "
               "every LayerNorm of the backbone (folds into their weights)", (*_PETL, "ssf"), impl="ssf", title="SSF"),
    MethodSpec("bitfit", "petl", "BitFit: every bias of the backbone and the head train", ("head", "bias"),
               impl="bitfit", title="BitFit"),
    MethodSpec("ifa", "fgir", "IFA: a learned mix of every block's CLS token into the head; no final LayerNorm",
               _PETL, impl="ifa", final_norm=False, needs=_CLS, upstream=(("classifier", "ifa"), *_NO_EXTRAS), title="IFA"),
    MethodSpec("mpncov", "fgir", "MPN-COV: iSQRT covariance pooling of the patch tokens (no CLS token)",
               ("head",), impl="mpncov", class_token=False, needs=("patch_grid",), upstream=(("classifier", "mpncov"), *_NO_EXTRAS),
               title="MPN-COV"),
    MethodSpec("transfg", "fgir", "TransFG: one token per head by the product of attention maps, into one "
               "more block", _PETL, impl="transfg", needs=("cls_token", "patch_grid"), replaces_blocks=1,
               upstream=(("selector", "psm"), *_NO_EXTRAS), title="TransFG"),
    MethodSpec("ffvt", "fgir", "FFVT: 12 tokens per block by mutual attention weights, into one more block",
               _PETL, impl="ffvt", final_norm=False, needs=_CLS, replaces_blocks=1,
               upstream=(("selector", "maws"), *_NO_EXTRAS), title="FFVT"),
    MethodSpec("glsim", "fgir", "GLSim: the box of the patches most similar to the CLS token, cropped for a second "
               "pass with its own CLS token; both CLS tokens into one more block", (*_PETL, "anchor"),
               impl="glsim", needs=("cls_token", "patch_grid", "abs_pos_embed"),
               upstream=(("selector", "glsim"), *_NO_EXTRAS), title="GLSim"),
    MethodSpec("rams", "fgir", "RAMS (as the reference implements it): GLSim's crop and second pass from attention "
               "rollout; the head on both CLS tokens, averaged", (*_PETL, "anchor"), impl="rams",
               needs=("cls_token", "patch_grid", "abs_pos_embed"), upstream=(("selector", "rollout"), *_NO_EXTRAS), title="RAMS"),
    MethodSpec("cal", "fgir", "CAL: 32 WS-DAN attention maps pool the patch tokens (no CLS token); trained with "
               "counterfactual maps, attention crops and drops; evaluated on 3 crops of the image and its mirror",
               ("head",), impl="cal", class_token=False, needs=("patch_grid",),
               upstream=(("selector", "cal"), *_NO_EXTRAS), title="CAL"),
    MethodSpec("simtrans", "fgir", "SimTrans (as the reference implements it): after each of the last 3 blocks, the "
               "patches above the mean CLS attention, placed around their anchor, go through a graph convolution "
               "whose anchor row is added to the CLS token; the 3 CLS tokens into a BatchNorm head; every weight trains",
               ("all",), impl="simtrans", needs=("cls_token", "patch_grid"), upstream=(("selector", "sil"), *_NO_EXTRAS), title="SimTrans"),
    MethodSpec("clca", "fgir", "CLCA: a carrier token and a cache of per-block token means, recovered after each "
               "token reduction (model.token_reduction) and after block D-2; the CLS tokens of the reduction blocks and "
               "the last into a depthwise-conv head; no final LayerNorm; every weight trains", ("all",), impl="clca",
               final_norm=False, needs=(*_CLS, "token_reduction"), needs_reduction=True,
               upstream=(("clc", True), ("ifa_head", True), ("keep_rate", True), ("reduction_loc", True),
                         ("freeze_backbone", False)), title="CLCA"),
    MethodSpec("ila", "ila", "Down-sampling ILA only, after blocks 3 and 7",
               (*_PETL, "ila"), ila_ds_locs=(3, 7), needs=_GRID, grid_for="ila",
               upstream=(("ila", True), ("adapter", False), ("ila_locs", False)), title="ILA (DS only)"),
    MethodSpec("ila_plus", "ila", "ILA+: down-sampling ILA after blocks 3 and 7, same-resolution ILA after the rest",
               (*_PETL, "ila"), ila_ds_locs=(3, 7), ila_rest=True, needs=_GRID, grid_for="ila",
               upstream=(("ila", True), ("adapter", False), ("ila_locs", True)), title="ILA+"),
    MethodSpec("ila_pp", "ila", "ILA++: down-sampling ILA after blocks 3 and 7 + parallel adapters in every block",
               (*_PETL, "adapters", "ila"), adapter="adapter", ila_ds_locs=(3, 7), needs=_GRID, grid_for="ila",
               upstream=(("ila", True), ("adapter", True)), title="ILA++"),
    MethodSpec("ila_lora", "ila", "Down-sampling ILA after blocks 3 and 7 + LoRA (peft) in place of ILA++'s adapters, "
               "rank 9: its LoRA count is the closest to ILA++'s adapters", (*_PETL, "lora", "ila"), impl="lora",
               ila_ds_locs=(3, 7), needs=_GRID, grid_for="ila", lora_rank=9, title="ILA + LoRA"),
)

#: How figures and tables name a family.
FAMILY_TITLES: dict[str, str] = {"ila": "ILA", "petl": "PETL", "fgir": "FGIR", "full": "full fine-tuning"}

METHODS: dict[str, MethodSpec] = {m.name: m for m in TABLE}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
ILA_METHODS: tuple[str, ...] = tuple(m.name for m in TABLE if m.has_ila)

_NEED_WORDS = {"cls_token": "reads the CLS token", "patch_grid": "works on the patch grid",
               "abs_pos_embed": "resamples an absolute position embedding",
               "token_reduction": "reduces tokens inside plain ViT blocks"}
_LACK_WORDS = {"cls_token": "has none", "patch_grid": "has no patch grid", "abs_pos_embed": "has none",
               "token_reduction": "has timm's Eva blocks"}


def backbone_refusal(spec: MethodSpec, backbone: str) -> str | None:
    """Why ``spec`` cannot run on ``backbone``, in one line, from the method's declared needs and the
    backbone's family (``geometry.FAMILIES``); None when it can, or when no family knows the name (the
    build checks the built backbone then)."""
    family = backbone_family(backbone)
    missing = [n for n in spec.needs if family is not None and not family.has(n)]
    if not missing:
        return None
    ok = ", ".join(m.name for m in TABLE if all(family.has(n) for n in m.needs))
    return (f"method {spec.name!r} {_NEED_WORDS[missing[0]]}, and model.backbone {backbone!r} ({family.title}) "
            f"{_LACK_WORDS[missing[0]]}; choose another backbone, or a method that runs on it ({ok})")


def support_matrix() -> dict[str, dict[str, str]]:
    """Method -> family key -> "yes" or the need it lacks: the README's method x family table."""
    return {m.name: {f.key: next((n for n in m.needs if not f.has(n)), "yes") for f in FAMILIES} for m in TABLE}


#: The entry point group through which another installed package adds methods. An entry point names a
#: torch-free `MethodSpec` (``impl`` = ``"package.module:Class"``, the method object, imported only when a
#: model is built), e.g. in the plugin's pyproject.toml:
#: ``[project.entry-points."ufgir.methods"] mean_probe = "ufgir_mean_probe.spec:SPEC"``.
ENTRY_POINT_GROUP = "ufgir.methods"


class PluginError(ValueError):
    """A plugin method that breaks a rule; the message names its entry point and distribution."""


_plugins: dict[str, MethodSpec] | None = None


def _load_plugin(ep) -> MethodSpec:
    dist = getattr(ep.dist, "name", None) or "an unknown distribution"
    where = f"entry point {ep.name!r} ({ep.value}) of {dist}"
    try:
        spec = ep.load()
    except Exception as e:  # noqa: BLE001 - any import failure of someone else's package
        raise PluginError(f"method plugin {where} cannot be imported: {type(e).__name__}: {e}") from None
    if not isinstance(spec, MethodSpec):
        raise PluginError(f"method plugin {where} must name a ufgir_cli.methods.MethodSpec, not a {type(spec).__name__}")
    if spec.name != ep.name:
        raise PluginError(f"method plugin {where} names the method {spec.name!r}; the entry point's name must be the same")
    if spec.name in METHODS:
        raise PluginError(f"method plugin {where} takes the name {spec.name!r} of a built-in method; rename it")
    if ":" not in spec.impl:
        raise PluginError(f"method plugin {where}: impl {spec.impl!r} must be 'package.module:Class'")
    if not spec.trains:
        raise PluginError(f"method plugin {where}: trains is empty; a method must train something")
    return replace(spec, origin=where)


def plugins() -> dict[str, MethodSpec]:
    """Methods that other installed packages add through the ``ufgir.methods`` entry point group (read
    once per process; their specs are torch-free, their method objects are imported only at build)."""
    global _plugins
    if _plugins is None:
        from importlib.metadata import entry_points

        found = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found[ep.name] = _load_plugin(ep)
        _plugins = found
    return _plugins


def refresh_plugins() -> None:
    """Forget the plugins read so far (a package was installed or put on ``sys.path`` meanwhile)."""
    global _plugins
    _plugins = None


def all_methods() -> dict[str, MethodSpec]:
    """The table's methods, then the plugins'."""
    return {**METHODS, **plugins()}


def method_spec(name: str) -> MethodSpec:
    if name in METHODS:
        return METHODS[name]
    found = plugins().get(name)
    if found is None:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, all_methods())}; known: {', '.join(all_methods())}")
    return found


def _flag_holds(value: object, test: FlagTest) -> bool:
    if isinstance(test, bool):
        return bool(value) is test
    return test in str(value or "").lower()


def _specificity(spec: MethodSpec) -> int:
    # A text test says more than a set/unset test: "prompt contains deep" beats "prompt is set".
    return sum(2 if isinstance(t, str) else 1 for _, t in spec.upstream)


def detect_upstream(flags: dict[str, object]) -> MethodSpec | None:
    """The method a reference config's flags describe: of the rows whose tests all hold, the most
    specific one (None when no row matches). Flags the config lacks count as unset."""
    hits = [m for m in TABLE if m.upstream and all(_flag_holds(flags.get(k), t) for k, t in m.upstream)]
    return max(hits, key=_specificity, default=None)


__all__ = ["ENTRY_POINT_GROUP", "FAMILY_TITLES", "ILA_METHODS", "METHODS", "METHOD_NAMES", "TABLE", "MethodSpec",
           "PluginError", "all_methods", "backbone_refusal", "detect_upstream", "method_spec", "plugins",
           "refresh_plugins", "support_matrix"]
