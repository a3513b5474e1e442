"""dms_runtime: a runtime for Dynamic Memory Sparsification (DMS) models.

``load()`` a model by embedded name, local folder or GGUF file, then ``generate()``.
"""

from .api import GenerationResult, LoadedModel, generate, load
from .config import DMSConfig, ModelConfig
from .sampling import SamplingParams

__all__ = ["load", "generate", "LoadedModel", "GenerationResult", "SamplingParams", "DMSConfig", "ModelConfig"]
__version__ = "0.1.0"

from .engine import Engine, majority_vote  # noqa: E402
from .paged import PagedConfig  # noqa: E402

__all__ += ["Engine", "PagedConfig", "majority_vote"]
