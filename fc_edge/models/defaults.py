"""The defaults of a split, one place for the CLI and the Python API (imports nothing heavy, so
the CLI can show them in ``--help`` without loading torch)."""

#: The model when none is given: SmolLM2-135M-Instruct (fc_edge.models.pretrained).
DEFAULT_MODEL = "smollm2-135m"
#: The split layer when none is given: after the first decoder layer (the paper's split, the one
#: docs/results.md measures).
DEFAULT_SPLIT_LAYER = 1
#: The codec of a generation when none is given: ``rotated`` holds accuracy at 8x vs float32 on
#: SmolLM2-135M (docs/results.md), where the paper's ``fourier`` turns the text to gibberish.
DEFAULT_CODEC = "rotated"
