"""ModelInfo: everything the service knows about one model, from its store entry and GGUF header."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What a chat template that can reason refers to: the tags, the reasoning fields of earlier
# turns, gpt-oss's effort levels, and "thinking" (Qwen3's enable_thinking switch among them).
_THINKING_MARKS = ("<think>", "reasoning_content", "reasoning_effort", "thinking")


@dataclass
class ModelInfo:
    """One servable model.

    ``name`` is the short form clients see (``smollm2:135m``, ``hf.co/user/repo:tag``);
    ``context_length`` is the trained context from the GGUF header (``<arch>.context_length``).
    """

    name: str
    path: Path  # the GGUF file
    source: str  # "ollama" (a manifest in the store) or "gguf" (a plain file)
    digest: str = ""  # hex sha256 of the manifest (Ollama) or of the file name (gguf folder)
    size: int = 0  # bytes: all layers, as /api/tags reports
    modified_at: float = 0.0  # unix time
    architecture: str = ""
    context_length: int = 0
    embedding_length: int = 0
    block_count: int = 0
    parameter_count: int = 0
    file_type: int | None = None
    quantization_level: str = ""
    family: str = ""
    families: list[str] = field(default_factory=list)
    chat_template: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # header keys, arrays left out
    params: dict[str, Any] = field(default_factory=dict)  # the manifest's params layer
    system: str | None = None  # the manifest's system layer
    template: str | None = None  # the manifest's (Go) template layer, shown by /api/show
    license: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)  # the messages layer
    projector: Path | None = None  # a vision projector (mmproj) when the model has one
    layers: list[dict[str, Any]] = field(default_factory=list)  # manifest layers as stored
    pooling: str | None = None  # embedding-only models
    vocab_size: int = 0  # tokens in the vocabulary (0: unknown)
    extra: dict[str, Any] = field(default_factory=dict)  # enrichment (ollama show)

    @property
    def parameter_size(self) -> str:
        """Human form of the parameter count, as Ollama shows it (``134.52M``, ``7.6B``)."""
        n = self.parameter_count
        if n >= 1_000_000_000:
            return f"{n / 1e9:.1f}B"
        if n >= 1_000_000:
            return f"{n / 1e6:.2f}M"
        if n >= 1_000:
            return f"{n / 1e3:.2f}K"
        return str(n) if n else ""

    @property
    def has_chat_template(self) -> bool:
        """True when the GGUF carries a chat template (an instruct model)."""
        return bool(self.chat_template)

    @property
    def is_embedding_only(self) -> bool:
        """True for models that only embed (BERT-like encoders)."""
        return self.architecture in {"bert", "nomic-bert", "jina-bert-v2", "t5encoder"}

    @property
    def capabilities(self) -> list[str]:
        """Ollama's capability names, derived from the header and template."""
        if self.is_embedding_only:
            return ["embedding"]
        caps = ["completion"]
        template = self.chat_template or ""
        if "tools" in template:
            caps.append("tools")
        if any(mark in template for mark in _THINKING_MARKS):
            caps.append("thinking")
        if self.projector is not None:
            caps.append("vision")
        if "suffix" in (self.template or "") or "fim" in template.lower():
            caps.append("insert")
        return caps

    def details(self) -> dict[str, Any]:
        """Ollama's ``details`` object."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family or self.architecture,
            "families": self.families or ([self.architecture] if self.architecture else None),
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }
