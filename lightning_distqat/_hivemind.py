"""hivemind, imported once without its import-time noise: its MoE layers call ``torch.jit.script``, which current
torch deprecates with a FutureWarning in every process. The filter applies to this import only; the user's warning
filters stay as they are. Modules of ours that use hivemind import this first (``swarm/__init__.py`` and
``quant/averaging.py``; everything else reaches hivemind through ``swarm``)."""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import hivemind  # noqa: F401
