"""Benchmarks and profilers: the scripts behind ``bench``, ``bench-sparse``,
``bench-memory`` and ``bench-mqtt`` (worker processes, timing, reports) and the
stand-alone ones run as ``python tools/bench/NAME.py`` (codec, conv, csr,
onnx_speed, sparse_grad, profile_step)."""
