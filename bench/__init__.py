"""Side-by-side benchmarks (see BENCHMARKS.md); results in bench/results/."""
