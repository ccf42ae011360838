"""VITS's KL regime on a real trained VITS (``pyro-vits real-study``, docs/real_vits.md): refit the
posterior encoder against a trained voice's frozen prior and decoder with VITS's loss
(:mod:`pyro_vits.models.refit`), audit the result on held-out utterances, and fine-tune it with each fix of
the KL loss. :mod:`.config` holds the settings, :mod:`.evaluate` the held-out measurements, :mod:`.run` the
stages (resumable), :mod:`.report` the page."""
