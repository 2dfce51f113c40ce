"""moepress: compress Mixture-of-Experts language models, and measure what it costs.

    import moepress
    result = moepress.compress("path/to/model", bits=3, group_size=128, calib="builtin:calib", out="out")
    model = moepress.load("out")
    report = moepress.evaluate("out", reference="path/to/model", text="builtin:eval")
"""

__version__ = "0.1.0"

from . import hf_integration as _hf_integration
from .calibrate import Profile, calibrate
from .compress import CompressConfig, CompressResult, compress
from .errors import MoepressError
from .evaluate import EvalReport, evaluate  # binds the function over the subpackage's name
from .model import MoEView
from .trim.dynamic import DynamicPruning

_hf_integration.register()

_STORED = object()


def load(path: str, *, device: str | None = None, dtype="auto", trust_remote_code: bool = False,
         dynamic_pruning=_STORED, runtime="fast"):
    """Load a model (a moepress checkpoint or any supported MoE) as a transformers model.

    ``dynamic_pruning`` (a :class:`DynamicPruning`, ``"0.3,0.1"``, or None for none) replaces the
    online dynamic pruning the checkpoint stores (``compress --dynamic-pruning``), if any.

    ``runtime``: ``"fast"`` (default) converts the packed weights once for the CPU kernels
    (:func:`moepress.runtime.fast.prepare`; a model on a GPU is left as loaded); ``"reference"``
    keeps the stored format in memory and dequantizes per call (what ``from_pretrained`` gives, and
    what :func:`moepress.evaluate` measures bytes on); a :class:`moepress.runtime.fast.FastOptions`
    is ``"fast"`` with options (``FastOptions(widen="all")``: 2/3-bit experts as 4-bit codes too)."""
    from .loading import load_model
    from .runtime.fast import FastOptions, prepare

    options = FastOptions.of(runtime)  # a bad value fails before the model is read
    model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if dynamic_pruning is not _STORED:
        from .trim.dynamic import install_dynamic_pruning

        install_dynamic_pruning(model, dynamic_pruning)
    if options is not None:
        prepare(model, options)
    return model


__all__ = [
    "CompressConfig",
    "CompressResult",
    "DynamicPruning",
    "EvalReport",
    "MoEView",
    "MoepressError",
    "Profile",
    "__version__",
    "calibrate",
    "compress",
    "evaluate",
    "load",
]
