"""grace-serve benchmarks: GPU measurements against peers, and the CPU routing simulation."""
