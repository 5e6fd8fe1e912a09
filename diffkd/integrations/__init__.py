"""Adapters that put DiffKD into other projects' trainers, each imported on demand (``import diffkd`` loads none):

- :mod:`diffkd.integrations.timm`: :class:`~diffkd.integrations.timm.DiffKDTask`, a ``timm.task.TrainingTask``;
- :mod:`diffkd.integrations.torchdistill`: a mid-level loss and a student wrapper registered in torchdistill's
  registries, so that a torchdistill YAML config can name them (``dependencies: [diffkd.integrations.torchdistill]``).
"""
