"""Medusa heads: the one module definition and its on-disk layouts."""

from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig

__all__ = ["MedusaHeads", "MedusaHeadsConfig"]
