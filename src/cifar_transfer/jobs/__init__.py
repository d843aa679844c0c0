"""The jobs on top of the stages: run (and repeat, eda), evaluate / analyze a saved run, tune, lr-
find.

Jobs import stages, never each other.
"""
