"""The embedded demo: coloured shapes that the `tiny` config learns to caption and to draw.

- `demo.shapes`: the world: the palette, the three shapes, `draw_shape` (the one drawing routine: the
  training source, the tiny parts' pretraining and the tests draw with it), the sampled shape of each
  (seed, index), captions ('a red circle') and T2I prompts ('A RED CIRCLE'), caption scoring and the
  image judge.
- `demo.evaluate`: what a trained model does on that world: held-out captions, every prompt drawn and
  judged, the labelled grid, eval.json. `evaluate.run` is what the training loop calls at the end.
"""
