"""Performance tools (`toolkit.perf`), each an options dataclass checked before any model loads, a run function
returning a JSON-ready dict, and a report function; `perf/cli.py` wires them to the `perf` command:

- `perf run` (`run.PerfRunOptions`, `run.run_perf`): throughput and latency percentiles of one artifact.
- `perf compare` (`compare.CompareOptions`, `compare.run_compare`): torch eager vs ONNX Runtime vs TVM.
- `perf profile` (`profile.ProfileOptions`, `profile.run_profile`): time per kernel (ONNX Runtime's profiler, the
  TVM VM's instrument), top kernels with GFLOP/s, a Chrome trace.
- `perf buckets` (`buckets.BucketOptions`, `buckets.run_bucket_benchmark`): fixed SEQ vs a bucket set.
- `perf traffic` (`traffic.TrafficOptions`, `traffic.run_traffic`): an evaluation set's requests through the public
  API, torch eager vs artifact sets: requests/s, padding, GFLOP/s against the matmul peak, agreement.
- `perf serve` (`serve_load.ServeLoadOptions`, `serve_load.run_serve_load`): `toolkit serve` under 64 clients vs the
  offline API, latency at half load, and on Ray Serve.

`common.py` holds what several of them share: inputs of an artifact's shape (random rows, a dataset's requests), the
`--instances` check, medians.
"""
