"""One module per job: build components from a config, run."""
