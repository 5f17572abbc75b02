"""Benchmark evaluation with the official protocol: `python -m cheers_jax.evaluate
{understanding,score,geneval,dpg,suite}` (docs/evaluation.md).

- datasets.py: the 12 understanding benchmarks, VLMEvalKit TSV reading, image decoding
- prompts.py: the dataset prompt + the Cheers wrapper's suffix + the chat template
- extract.py / scoring.py: the wrapper's answer post-processing and VLMEvalKit's exact-matching scorers
- vlmeval_io.py: what VLMEvalKit's file handling (TSV typing, xlsx round trip) does to the scored values
- understanding.py: batched greedy decoding of a TSV through the KV-cache decoder, resumable
- generation.py: GenEval and DPG-Bench image generation in the official layouts
- parallel.py: the share of each process and device; suite.py and paper.py: all benchmarks beside the paper

Nothing here imports TensorFlow.
"""
