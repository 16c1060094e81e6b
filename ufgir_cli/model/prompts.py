"""Prompt tokens as data: how each kind enters the blocks (VPT-shallow, VPT-deep, VQT's query-only
prompts). `UfgirViT` reads these flags; it never compares kind names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptKind:
    name: str
    #: Inserted once, after the embedding, and carried through every block (VPT-shallow).
    at_embedding: bool = False
    #: Inserted before each block after the prefix tokens and removed after it (VPT-deep).
    replaced: bool = False
    #: Per block, in front of the CLS token as queries only: attended by nothing, passed on as the
    #: next block's input prefix and dropped there (VQT; its head reads them).
    query_only: bool = False

    @property
    def per_block(self) -> bool:
        """One set of prompts per block (else one set before block 0)."""
        return not self.at_embedding

    @property
    def stays(self) -> bool:
        """The prompt rows are part of each block's output prefix."""
        return self.at_embedding or self.query_only

    @property
    def label(self) -> str:
        return "query-only prompts" if self.query_only else "prompts"

    def shown_at(self, block: int) -> bool:
        """Whether block ``block`` gets prompts of its own (what `ufgir inspect` lists)."""
        return self.per_block or block == 0


#: The prompt kinds a method row may name (``MethodSpec.prompts``).
PROMPT_KINDS: dict[str, PromptKind] = {
    "shallow": PromptKind("shallow", at_embedding=True),
    "deep": PromptKind("deep", replaced=True),
    "vqt": PromptKind("vqt", query_only=True),
}

__all__ = ["PROMPT_KINDS", "PromptKind"]
