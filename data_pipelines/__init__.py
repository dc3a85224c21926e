"""Data: source -> episode -> clip -> tokens -> batch. Each arrow is one module."""
