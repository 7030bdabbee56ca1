"""The benchmark scripts: one module per question, each owning one section of BENCHMARKS.md.

Run them from the repository root as ``scripts/dev python -m benchmarks.<name>`` (``--quick``
for a smoke run); ``_common`` holds what they share. Not part of the installed ``protogmm``
package: lightly, which ``lightly_side_by_side`` compares against, is the ``benchmarks`` extra.
"""
