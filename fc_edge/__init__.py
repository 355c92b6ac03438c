"""fc-edge: collaborative (split) LLM inference with activation compression.

A device runs the embedding and the first decoder layer(s), compresses the activation with a
codec (FourierCompress or one of its peers) and an edge server reconstructs it and runs the rest.
"""

from fc_edge.errors import BudgetError, ConfigError, FcEdgeError, ModelError, WireError

__version__ = "0.1.0"

__all__ = ["BudgetError", "ConfigError", "FcEdgeError", "ModelError", "WireError", "__version__"]
