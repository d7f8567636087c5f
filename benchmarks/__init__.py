"""pytest-benchmark suites comparing taskvec with the tools users would otherwise pick (see README.md)."""
