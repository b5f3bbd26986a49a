"""The benchmarks, outside the installed package (as timm keeps benchmark.py beside its package): `make bench`
runs `benchmarks.run`, `make bench-gpu` runs `benchmarks.bench_gpu`."""
