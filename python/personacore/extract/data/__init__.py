"""Built-in trait files, one persona_vectors-format JSON per trait (see :mod:`personacore.extract.traits`).

These files are written for personacore; they are not copied from persona_vectors.
"""
