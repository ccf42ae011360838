"""The studies behind the docs: :mod:`.kl` (the KL-estimator study) and :mod:`.speech` (the speech study)."""
