"""The run machinery shared by every stage: settings, the stage cache, the stage declaration and its executor,
partitions, batching, records and failures, model loading and the preflight, media tools, and the outputs
(shards and tables) a run publishes."""
