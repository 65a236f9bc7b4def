"""Reading and judging results: compare, the CI gate and its driver, reports, export."""
