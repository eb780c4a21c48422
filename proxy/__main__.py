"""`python -m proxy` is `mlproxy`."""

from .cli import main

main()
