"""
cc50tw's benchmarks: ``python -m benchmarks`` runs the suite (``suite.py``);
the ``bench_*.py`` modules are its parts and still run alone as scripts.
See README.md here.
"""
