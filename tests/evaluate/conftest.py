"""The tiny oracle checkpoint, shared with the inference tests (loaded once per session)."""

from tests.infer.conftest import tiny, tokenizer  # noqa: F401  (fixtures)
