"""Convert a DeepSeek-V3 checkpoint (the mid-size benchmark's) to a GGUF for llama.cpp.

llama.cpp's own converter (``convert_hf_to_gguf.py`` of a llama.cpp source tree, e.g. the one
vendored in the ``llama-cpp-python`` sdist) does the work. It needs a tokenizer beside the
weights, which a random checkpoint does not have: this script trains a small byte-level BPE on
this repository's Python sources and saves it there (the converter pads the vocabulary to the
config's ``vocab_size``), and tells the converter to treat its pre-tokenizer as llama.cpp's
default one (the converter only knows released tokenizers by a hash). Token ids are what the
benchmark feeds, so the tokenizer's quality does not matter.

    .venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python gguf   # builds llama.cpp
    .venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llsrc
    tar xzf /tmp/llsrc/llama_cpp_python-*.tar.gz -C /tmp/llsrc
    .venv/bin/python benchmarks/make_gguf.py /tmp/r1edge-midsize \\
        --convert /tmp/llsrc/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py --out /tmp/midsize-q8_0.gguf
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_tokenizer(checkpoint: Path, vocab: int) -> None:
    """Train a byte-level BPE of at most ``vocab`` tokens on the repo's sources into ``checkpoint``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 2048), special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sources = sorted(str(p) for d in ("runtime", "sdk", "plc_bridge") for p in (REPO / d).rglob("*.py"))
    tok.train(sources, trainer)
    tok.save(str(checkpoint / "tokenizer.json"))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a DeepSeek-V3 checkpoint directory (config.json + safetensors)")
    p.add_argument("--convert", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--out", type=Path, required=True, help="the GGUF to write")
    p.add_argument("--outtype", default="q8_0", help="the converter's --outtype (default q8_0)")
    args = p.parse_args()
    if not (args.checkpoint / "tokenizer.json").exists():
        add_tokenizer(args.checkpoint, json.loads((args.checkpoint / "config.json").read_text())["vocab_size"])
    sys.path.insert(0, str(args.convert.parent))
    from conversion.base import TextModel                    # the converter's package, beside it

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    sys.argv = [str(args.convert), str(args.checkpoint), "--outfile", str(args.out), "--outtype", args.outtype]
    runpy.run_path(str(args.convert), run_name="__main__")


if __name__ == "__main__":
    main()
