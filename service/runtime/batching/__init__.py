"""How images share the engine: the step loop (steploop.py, the default: images join and leave
the running batch between denoising steps), the request-level batcher (batcher.py, whole batches;
SD_BATCHING=request), and failure isolation for whole batches (oom.py)."""
