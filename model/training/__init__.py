"""What only training uses: the training loop (``train``), its config, one training step, batches from the shards,
the experts' training, memory estimates and size summaries, and the tiny component sizes for CPU runs."""
