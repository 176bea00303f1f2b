"""Benchmarks of d2v_kernels against the implementations a user would otherwise pick.

``d2v-kernels bench`` (or ``python -m bench``) runs them; ``bench/common.py`` holds the shared
timing, checking, environment and result-writing pieces; ``bench/op_benchmark.py`` the command
line and main loop of an op benchmark; ``bench/report.py`` renders stored results. Importing this
package does no GPU work.
"""
