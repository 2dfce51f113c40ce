"""The streaming pipeline: sources read one decoder layer at a time, the one layer loop, resumable runs."""

from .runner import LayerLoop, LayerwiseRunner, resolve_device
from .source import ResidentModel, StreamedModel, open_source

__all__ = ["LayerLoop", "LayerwiseRunner", "ResidentModel", "StreamedModel", "open_source", "resolve_device"]
