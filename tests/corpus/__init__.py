"""The corpus of bad inputs: specs (``specs/``), factory files (``factories/``) and a builder
for the binary inputs (``build.py``), so no checkpoint or data file is committed."""
