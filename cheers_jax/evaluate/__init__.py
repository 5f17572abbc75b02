"""Benchmark evaluation with the official protocol: `python -m cheers_jax.evaluate {understanding,score,geneval,dpg}`.

- datasets.py: the 12 understanding benchmarks, VLMEvalKit TSV reading, image decoding
- prompts.py: the dataset prompt + the Cheers wrapper's suffix + the chat template
- extract.py / scoring.py: the wrapper's answer post-processing and VLMEvalKit's exact-matching scorers
- understanding.py: batched greedy decoding of a TSV through the KV-cache decoder, resumable
- generation.py: GenEval and DPG-Bench image generation in the official layouts

Nothing here imports TensorFlow; JAX and the model are imported only by the commands that run a model.
"""
