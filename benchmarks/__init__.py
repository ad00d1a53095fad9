"""Speed and memory benchmarks (not part of the test run; `python -m benchmarks.run`)."""
