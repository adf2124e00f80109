"""The preprocessing pipeline: raw talking-face videos to clips, features, shards and tables (no Prefect here).

- ``datasets/``: finding the candidate clips of HDTF, VFHQ, MEAD or a folder of videos
- ``video/``, ``audio/``, ``visual/``: the stages of the three groups the flow runs, one module per stage, each
  ending with its ``STAGE`` declaration
- ``pipeline``: the table of stages in order, and the groups
- ``run/``: the machinery every stage shares (settings, cache, executor, partitions, model loading, outputs)
"""
