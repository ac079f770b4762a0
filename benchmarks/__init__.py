"""fastadapter's benchmark suite, installed as ``fastadapter.benchmarks`` (see benchmarks/README.md).

``fastadapter bench`` runs it from any install; from the checkout's root ``python -m benchmarks.<module>`` also
runs one module. Modules import each other relatively, so both names work.
"""
