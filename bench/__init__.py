"""``python -m bench`` (``make bench``): logpipe's throughput, latency and memory figures.

Every figure is a ratio against a ceiling measured in the same run on the same servers (the test
harness's real Kafka and Elasticsearch on loopback), because the machine is noisy and shared:
absolute rates from different runs are not comparable, ratios mostly are. Nothing here asserts a
timing; the run writes ``docs/BENCHMARKS.md`` and ``bench/results.json``.
"""
