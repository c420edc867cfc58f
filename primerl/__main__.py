"""`python -m primerl` is the `primerl` command."""

from primerl.cli import main

main()
