"""The one door to private internals: transformers' generation methods, private attributes and flags, source
inspection, release differences, and PyTorch's private ops. Each module is guarded by tests/test_seams.py, which
fails with the transformers version and what moved.

- compat.py: release differences (the cache keyword, the crop convention)
- attention_impl.py: which attention a model runs (`config._attn_implementation`) and switching it
- model_checks.py: `_supports_*` flags and modeling-source inspection behind `enable_paged_cache`'s refusals
- layer_windows.py: the sliding windows stock's cache keeps per layer
- tensor_parallel.py: how many ranks `tp_plan` sharded a model over (`_tp_size`) and the KV heads each receives
- torch_ops.py: the fused CPU flash-attention op that returns its log-sum-exp
- generate.py: per-model overrides of four `GenerationMixin` methods (the paged cache, the inputs before expansion,
  prefill once, caches kept when returned); prefill_once.py: the prompt forward once per prompt
- wrapped_models.py: the transformers model inside PEFT, torch.compile and data-parallel wrappers
- compile_boundary.py: attention modules given a paged cache run outside torch.compile's graphs
"""
