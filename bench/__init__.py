"""Benchmarks for SoftCAM Review (``python -m bench`` / ``make bench``): ratios measured side by side.

Each module ``bench.<name>`` defines ``NAME`` and ``run(config) -> list[Result]``; see
``docs/performance.md`` for what each one measures and the figures.
"""

BENCHMARKS = ("forward", "explain_overhead", "fast_methods", "deletion", "evaluate_memory", "review_latency", "report_cost",
              "evaluate_scaling")
