"""Medusa choice trees: presets, parsing, validation and the buffers derived from a tree."""

from medusa_forge.tree.choice_tree import TOPK, ChoiceTree, TreeBuffers, tree_buffers

__all__ = ["TOPK", "ChoiceTree", "TreeBuffers", "tree_buffers"]
