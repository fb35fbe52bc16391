"""DiLoCo (Douillard et al., 2023): replicas take H inner steps apart, then average their pseudo-gradients (outer
params - local params) and take one outer step together.

- ``config``: :class:`DiLoCoConfig` (exported by ``lightning_distqat``) and the names of averaging groups;
- ``outer``: :class:`OuterState`, the math (no network, unit-tested against a plain reference);
- ``compression``: which hivemind compression carries the pseudo-gradients;
- ``sync``: :class:`DiLoCoSync`, one replica's rounds over hivemind decentralized averaging;
- ``rounds``: :class:`TrainerRounds`, a trainer driving the rounds of its pipeline's experts and its own params.

None of it imports Lightning.
"""
