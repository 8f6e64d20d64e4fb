"""What people run: the sparsefedpp command line, benchmarks, reports."""
