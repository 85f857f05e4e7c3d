"""Building blocks of the DSA decoder layer."""
