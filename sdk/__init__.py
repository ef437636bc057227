"""r1edge public API: load models and packages, compress checkpoints, run controllers."""
from sdk.tools.compress import compress
from sdk.service.controller import Controller
from sdk.tools.loading import load_model
from sdk.tools.text import TextGenerator, load_tokenizer

__all__ = ["Controller", "TextGenerator", "compress", "load_model", "load_tokenizer"]
