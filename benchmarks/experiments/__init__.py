"""One-off scripts behind benchmarks/FINDINGS.md (not run by the harness or the tests)."""
