"""cld_fast benchmarks: ``python bench/run.py [--quick]`` writes Markdown tables and PNG plots to bench/results.

Modules: ``run`` (the command), ``kernels`` (fused ops vs eager / torch.compile), ``sampler`` (SSCS
throughput and same-noise agreement), ``training`` (optimizer-step throughput), ``quality`` (the
exact-score sampler study and toy CLD vs VP-SDE training), ``official_style`` (eager baselines with
the official CLD-SGM code's structure), ``plots`` and ``common`` (timers, profiler counts, Markdown).
Not part of the test suite: ``pytest bench/ --benchmark-only`` runs the pytest-benchmark wrappers.
"""
