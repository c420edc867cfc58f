"""Engine worker components of PrimeRL-ServeKit++."""
