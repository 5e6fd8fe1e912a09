"""``python -m diffkd.train``: train or distil a student end to end; with no arguments, the Fashion-MNIST demo.

One command covers teachers (``--method none``), the baselines (``kd``, ``dist``, ``mse``) and DiffKD, on a CPU
or on several GPUs (``torchrun --nproc_per_node=N -m diffkd.train ...``).  Flags follow timm's ``train.py``;
``-c/--config FILE.yaml`` sets defaults whose keys are the flag names with underscores, and flags given on the
command line win.  ``-b/--batch-size`` is the *global* batch of one optimizer step (split across processes and
``--grad-accum-steps``), so a recipe means the same on any number of GPUs.

Everything a run needs to be trusted lands in ``<output>/<experiment>/`` (see ``run_folder``).  ``--resume``
continues a run exactly where it stopped: from an epoch end, a mid-epoch checkpoint or a Ctrl-C.

The parts, one job each: ``cli`` (flags, config overlay, recipes), ``runtime`` (process group, device, precision,
log, stop requests), ``build`` (data, models, optimizer, LR schedule), ``tasks`` and ``dense`` (per-task data,
models, batches and metrics), ``loop`` (the training loop), ``guard`` (NaN and fp16 overflow), ``checkpoint`` and
``run_folder`` (what is written), ``resume`` (settings of new and resumed runs), ``runs`` (one run and its
failures), ``demo`` and ``command`` (the entry point).
"""
from diffkd.train.command import main

__all__ = ["main"]
