"""Benchmarks of fused-rlvr against plain torch and peer packages (run as `python -m bench.<script>`)."""
