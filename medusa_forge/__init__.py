"""medusa-forge: turn a Hugging Face causal LM plus Medusa heads into verified, served engines."""

__version__ = "0.1.0"
