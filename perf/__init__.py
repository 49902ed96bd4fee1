"""Performance tools: `perf run`, `perf compare`, bucket benchmark."""
