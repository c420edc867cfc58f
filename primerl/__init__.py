"""The `primerl` command line: wires the stages together."""
