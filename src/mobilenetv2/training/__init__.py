"""Training: one loop (`loop`) for every mode; what it trains comes from a task (`tasks`: images, in-memory
batches, cached backbone features from `head_cache`); the network and optimizer for a mode from `setup`; resume state
and keep-max from `run_checkpoints`; the seed's loss and learning-rate schedule; `run.run_training` ties them up."""
