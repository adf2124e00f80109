"""Tiny models of the default models' very classes, built offline from copies of their real configuration files.

A package of its own, outside the CLI package ``synchrorama``, because the preprocessing stages build them on
first use (``preprocess.stage_models``) and key their caches on ``VERSION`` (``preprocess.pipeline``): the
pipeline must not depend on the command line (tests/test_layering.py checks it).

- ``tiny_models.build``: ``build_tiny_models(directory)``, every tiny model; the audio ones are built there
- ``tiny_models.vision``: the captioner and Stable Diffusion 1.5's text encoder and VAE
- ``tiny_models.real_configs``: the real configuration files (``tiny_models/real_configs/<name>/``) and the
  "only sizes change" rule

    python -m tiny_models DIR
"""

from tiny_models.build import VERSION, build_tiny_models, is_built

__all__ = ["VERSION", "build_tiny_models", "is_built"]
