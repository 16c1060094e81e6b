"""The method table: the one place that says what each training method is.

A row names a method and says, as data, everything the rest of the package needs to know about it:
its family, a one-line description, which parts of the model train, which modules it adds (parallel
adapter kind, prompt kind, where its inter-layer adapters go by default), how a reference-code
checkpoint's config is recognised as this method, and its packaged recipe. Recipe validation,
``ufgir recipes list``, ``ufgir inspect``, ``import-upstream`` and ``model/methods.py`` (which maps the
row to the modules it builds) all read this table, so adding a method is one row here, its module(s)
under ``model/`` and a recipe under ``recipes/``.

It sits at the bottom layer beside ``recipe.py`` and imports neither torch nor pydantic: the recipe
types validate against it without importing the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["petl", "ila", "fgir", "full"]
#: Parts of a model that can train. "all" means every parameter (full fine-tuning).
Part = Literal["head", "cls", "anchor", "adapters", "ila", "prompts", "all"]
#: A reference-config flag test: True = set (truthy), False = unset or falsy, a string = the flag's
#: lower-cased text contains it.
FlagTest = bool | str
#: What turns the backbone's output into logits: a Linear on the CLS token (timm's head), or one of the
#: comparison methods' heads in ``model/heads.py``.
Head = Literal["linear", "ifa", "mpncov", "vqt", "aggregator", "avg_cls", "cal"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: Family
    description: str
    trains: tuple[Part, ...]
    adapter: Literal["adapter", "convpass"] | None = None  # parallel adapters in every block
    prompts: Literal["shallow", "deep", "vqt"] | None = None  # vqt: per-block query-only prompts
    head: Head = "linear"
    class_token: bool = True  # False: the backbone has no CLS token (MPN-COV pools the patch tokens)
    final_norm: bool = True  # False: no LayerNorm after the last block (IFA reads pre-norm CLS tokens)
    #: How tokens are picked: from attention (TransFG "psm", FFVT "maws"), or the patches whose box is
    #: cropped for a second pass (GLSim "glsim": similar to the CLS token; RAMS "rollout": attention rollout;
    #: CAL "cal": where its WS-DAN attention maps fire).
    selector: Literal["psm", "maws", "glsim", "rollout", "cal"] | None = None
    aggregator_norm: bool = False  # the aggregator block has a LayerNorm of its own (FFVT, GLSim)
    ila_ds_locs: tuple[int, ...] = ()  # default down-sampling ILA positions (a 12-block ViT's)
    ila_rest: bool = False  # default: a same-resolution ILA after every block without a DS-ILA
    upstream: tuple[tuple[str, FlagTest], ...] = ()  # how import-upstream recognises it
    recipe: str = ""  # packaged recipe name; the method's name when empty
    title: str = ""  # as the paper and figures name it ("ILA++"); the name when empty

    @property
    def has_ila(self) -> bool:
        return self.family == "ila"

    @property
    def recipe_name(self) -> str:
        return self.recipe or self.name

    @property
    def display_name(self) -> str:
        return self.title or self.name

    def default_ila_locs(self, depth: int, ds_locs: tuple[int, ...]) -> tuple[int, ...]:
        """Same-resolution ILA positions when the recipe leaves ``model.ila_locs`` unset."""
        return tuple(i for i in range(depth) if i not in ds_locs) if self.ila_rest else ()


_PETL = ("head", "cls")
_NO_EXTRAS = (("ila", False), ("adapter", False), ("prompt", False))

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
               (*_PETL, "adapters"), adapter="convpass", upstream=(("adapter", "convpass"), ("ila", False)), title="ConvPass"),
    MethodSpec("vqt", "petl", "VQT: per-block query-only prompts whose outputs, with the CLS token, feed the head",
               (*_PETL, "prompts"), prompts="vqt", head="vqt",
               upstream=(("prompt", "vqt"), ("ila", False), ("adapter", False)), title="VQT"),
    MethodSpec("ifa", "fgir", "IFA: a learned mix of every block's CLS token into the head; no final LayerNorm",
               _PETL, head="ifa", final_norm=False, upstream=(("classifier", "ifa"), *_NO_EXTRAS), title="IFA"),
    MethodSpec("mpncov", "fgir", "MPN-COV: iSQRT covariance pooling of the patch tokens (no CLS token)",
               ("head",), head="mpncov", class_token=False, upstream=(("classifier", "mpncov"), *_NO_EXTRAS),
               title="MPN-COV"),
    MethodSpec("transfg", "fgir", "TransFG: one token per head by the product of attention maps, into one "
               "more block", _PETL, head="aggregator", selector="psm",
               upstream=(("selector", "psm"), *_NO_EXTRAS), title="TransFG"),
    MethodSpec("ffvt", "fgir", "FFVT: 12 tokens per block by mutual attention weights, into one more block",
               _PETL, head="aggregator", selector="maws", final_norm=False, aggregator_norm=True,
               upstream=(("selector", "maws"), *_NO_EXTRAS), title="FFVT"),
    MethodSpec("glsim", "fgir", "GLSim: the box of the patches most similar to the CLS token, cropped for a second "
               "pass with its own CLS token; both CLS tokens into one more block", (*_PETL, "anchor"),
               head="aggregator", selector="glsim", aggregator_norm=True,
               upstream=(("selector", "glsim"), *_NO_EXTRAS), title="GLSim"),
    MethodSpec("rams", "fgir", "RAMS (as the reference implements it): GLSim's crop and second pass from attention "
               "rollout; the head on both CLS tokens, averaged", (*_PETL, "anchor"), head="avg_cls",
               selector="rollout", upstream=(("selector", "rollout"), *_NO_EXTRAS), title="RAMS"),
    MethodSpec("cal", "fgir", "CAL: 32 WS-DAN attention maps pool the patch tokens (no CLS token); trained with "
               "counterfactual maps, attention crops and drops; evaluated on 3 crops of the image and its mirror",
               ("head",), head="cal", selector="cal", class_token=False,
               upstream=(("selector", "cal"), *_NO_EXTRAS), title="CAL"),
    MethodSpec("ila", "ila", "Down-sampling ILA only, after blocks 3 and 7",
               (*_PETL, "ila"), ila_ds_locs=(3, 7),
               upstream=(("ila", True), ("adapter", False), ("ila_locs", False)), title="ILA (DS only)"),
    MethodSpec("ila_plus", "ila", "ILA+: down-sampling ILA after blocks 3 and 7, same-resolution ILA after the rest",
               (*_PETL, "ila"), ila_ds_locs=(3, 7), ila_rest=True,
               upstream=(("ila", True), ("adapter", False), ("ila_locs", True)), title="ILA+"),
    MethodSpec("ila_pp", "ila", "ILA++: down-sampling ILA after blocks 3 and 7 + parallel adapters in every block",
               (*_PETL, "adapters", "ila"), adapter="adapter", ila_ds_locs=(3, 7),
               upstream=(("ila", True), ("adapter", True)), title="ILA++"),
)

#: How figures and tables name a family.
FAMILY_TITLES: dict[str, str] = {"ila": "ILA", "petl": "PETL", "fgir": "FGIR", "full": "full fine-tuning"}

METHODS: dict[str, MethodSpec] = {m.name: m for m in TABLE}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
ILA_METHODS: tuple[str, ...] = tuple(m.name for m in TABLE if m.has_ila)


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}") from None


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


__all__ = ["FAMILY_TITLES", "ILA_METHODS", "METHODS", "METHOD_NAMES", "TABLE", "MethodSpec", "detect_upstream", "method_spec"]
