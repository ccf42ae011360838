"""pyro_vits: the VITS prior/posterior as a Pyro probabilistic program."""
