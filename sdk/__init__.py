"""r1edge public API: load models and packages, compress checkpoints, run controllers."""
from sdk.compress import compress
from sdk.controller import Controller
from sdk.loading import load_model
from sdk.text import TextGenerator, load_tokenizer

__all__ = ["Controller", "TextGenerator", "compress", "load_model", "load_tokenizer"]
