"""Command line and launchers: `strata ...`, local multi-process, Ray and SLURM.

Imports everything else; nothing imports `launch`.
"""
