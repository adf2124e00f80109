"""Tiny models of the default models' very classes, built offline from copies of their real configuration files.

A package of its own, above ``preprocess/`` and ``model/``: the CLI, the flows and the tests register ``BUILDER``
with ``preprocess.run.model_loading.register_tiny_builder``, which then builds the models on first use and keys
the stages' caches on ``VERSION``. The stages never import this package (tests/test_layering.py checks it).

- ``tiny_models.build``: ``build_tiny_models(directory)``, every tiny model; the audio ones are built there
- ``tiny_models.vision``: the captioner and Stable Diffusion 1.5's text encoder and VAE
- ``tiny_models.real_configs``: the real configuration files (``tiny_models/real_configs/<name>/``) and the
  "only sizes change" rule

    python -m tiny_models DIR
"""

from pathlib import Path

from tiny_models.build import VERSION, build_tiny_models, is_built


class _TinyModelBuilder:
    """``preprocess.run.model_loading.TinyModelBuilder``: builds the tiny models unless this version is there."""

    version = VERSION

    def build(self, directory: Path) -> Path:
        if not is_built(directory):  # missing, or built by an older version of the builder
            build_tiny_models(directory)
        return Path(directory)


BUILDER = _TinyModelBuilder()

__all__ = ["BUILDER", "VERSION", "build_tiny_models", "is_built"]
