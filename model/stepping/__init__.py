"""Step-level batching: items join and leave the running set between denoising steps.

An item is *admitted* (prompts encoded, its own latents drawn from its own seed, its own
scheduler: ``admission.py``), *advanced* one step at a time beside every other running item of
its size and adapter set in one UNet call with a timestep per row (``running.py``, rows laid out and padded to
buckets by ``rows.py``), and *retired* into a batched VAE decode plus safety checker
(``decode.py``). ``item.py`` holds one item's state and the checkpoint that makes a failed step
leave every item as it was.
"""
