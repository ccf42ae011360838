"""Measurement code of ``pyro-vits bench`` (:mod:`pyro_vits.apps.bench`), on the public API only.

- :mod:`~pyro_vits.bench.problem`: VITS-sized flow, batch, guides and VITS's hand-written KL loss;
- :mod:`~pyro_vits.bench.steps`: the timed training steps (raw, Pyro with K particles or K KL particles, ...);
- :mod:`~pyro_vits.bench.timing`: interleaved rounds, paired ratios, profiles;
- :mod:`~pyro_vits.bench.memory`: step memory, leak check and ``evaluate``'s memory in fresh processes;
- :mod:`~pyro_vits.bench.compiled`: ``torch.compile`` of the flow;
- :mod:`~pyro_vits.bench.report`: targets, JSON and the printed summary.
"""
